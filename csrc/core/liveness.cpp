#include "core/liveness.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace pap {

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) reset(o.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  // close() is not retried on EINTR: on Linux the descriptor is gone anyway.
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace liveness {
namespace {

struct flock range(short type, uint32_t first, uint32_t n) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(first);
  fl.l_len = static_cast<off_t>(n);
  fl.l_pid = 0;  // required for OFD locks
  return fl;
}

int fcntl_retry(int fd, int cmd, struct flock* fl) {
  int r;
  do {
    r = ::fcntl(fd, cmd, fl);
  } while (r != 0 && errno == EINTR);
  return r;
}

}  // namespace

bool lock_slot(int fd, uint32_t slot) {
  struct flock fl = range(F_WRLCK, slot, 1);
  return fcntl_retry(fd, F_OFD_SETLK, &fl) == 0;
}

void unlock_slot(int fd, uint32_t slot) {
  struct flock fl = range(F_UNLCK, slot, 1);
  fcntl_retry(fd, F_OFD_SETLK, &fl);
}

bool any_held_by_other(int fd, uint32_t first, uint32_t n) {
  struct flock fl = range(F_WRLCK, first, n);
  if (fcntl_retry(fd, F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: alive
  return fl.l_type != F_UNLCK;
}

bool held_by_other(int fd, uint32_t slot) { return any_held_by_other(fd, slot, 1); }

}  // namespace liveness
}  // namespace pap
