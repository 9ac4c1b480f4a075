#include "core/liveness.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>

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

std::vector<bool> locked_bytes_hint(int fd, uint32_t n) {
  std::vector<bool> out;
  struct stat st;
  if (::fstat(fd, &st) != 0) return out;
  std::FILE* f = std::fopen("/proc/locks", "re");
  if (!f) return out;
  out.assign(n, false);
  // "1: OFDLCK ADVISORY  WRITE -1 00:1a:1234 5 5" (a waiter's line has
  // "->" after the number): the device as hex major:minor, the inode, and
  // the first and last byte ("EOF": to the end of the file).
  char line[256];
  while (std::fgets(line, sizeof line, f)) {
    char* save = nullptr;
    char* tok = strtok_r(line, " \t\n", &save);
    char* where = nullptr;
    for (; tok; tok = strtok_r(nullptr, " \t\n", &save))
      if (std::strchr(tok, ':') != std::strrchr(tok, ':')) {
        where = tok;
        break;
      }
    if (!where) continue;
    unsigned maj = 0, min = 0;
    uintmax_t ino = 0;
    if (std::sscanf(where, "%x:%x:%ju", &maj, &min, &ino) != 3) continue;
    if (ino != static_cast<uintmax_t>(st.st_ino) || maj != major(st.st_dev) ||
        min != minor(st.st_dev))
      continue;
    const char* first = strtok_r(nullptr, " \t\n", &save);
    const char* last = strtok_r(nullptr, " \t\n", &save);
    if (!first || !last) continue;
    const uintmax_t lo = std::strtoumax(first, nullptr, 10);
    const uintmax_t hi =
        std::strcmp(last, "EOF") == 0 ? uintmax_t{n} : std::strtoumax(last, nullptr, 10);
    for (uintmax_t b = lo; b <= hi && b < n; ++b) out[b] = true;
  }
  std::fclose(f);
  return out;
}

}  // namespace liveness
}  // namespace pap
