#include "core/shm_segment.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "core/errors.hpp"

namespace pap {
namespace {

void* map_fd(int fd, uint64_t size, const std::string& name) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw_os_error("mmap " + name, errno);
  return p;
}

}  // namespace

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    if (addr_) ::munmap(addr_, size_);
    addr_ = o.addr_;
    size_ = o.size_;
    o.addr_ = nullptr;
  }
  return *this;
}

Mapping::~Mapping() {
  if (addr_) ::munmap(addr_, size_);
}

void fill_random(void* out, size_t len) {
  auto* p = static_cast<unsigned char*>(out);
  for (size_t got = 0; got < len;) {
    ssize_t n = ::getrandom(p + got, len - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_os_error("getrandom", errno);
    }
    got += static_cast<size_t>(n);
  }
}

std::string to_hex(const unsigned char* bytes, size_t len) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  s.reserve(2 * len);
  for (size_t i = 0; i < len; ++i) {
    s += hex[bytes[i] >> 4];
    s += hex[bytes[i] & 15];
  }
  return s;
}

std::string random_token() {
  unsigned char bytes[16];
  fill_random(bytes, sizeof bytes);
  return to_hex(bytes, sizeof bytes);
}

bool valid_token(const std::string& token) {
  if (token.size() != kTokenHexLen) return false;
  for (char c : token)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

std::string control_name(const std::string& token) { return "/" + std::string(kShmPrefix) + token; }

std::string data_name(const std::string& token, uint32_t index, uint64_t nonce) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(nonce));
  return control_name(token) + "-" + std::to_string(index) + "-" + hex;
}

uint64_t random_u64() {
  uint64_t v;
  fill_random(&v, sizeof v);
  return v;
}

CreateResult create_segment(const std::string& name, uint64_t size, Mapping* out, UniqueFd* fd_out,
                            uint64_t reserve_bytes) {
  if (reserve_bytes == 0 || reserve_bytes > size) reserve_bytes = size;
  int raw;
  do {
    raw = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) {
    if (errno == EEXIST) return CreateResult::kExists;
    if (errno == ENOSPC || errno == ENOMEM)
      throw CoreError(ErrorKind::kPoolFull, "cannot create " + name + ": /dev/shm is full", errno);
    throw_os_error("shm_open " + name, errno);
  }
  UniqueFd fd(raw);
  try {
    // A umask can only remove bits; make the mode exactly 0600 regardless.
    if (::fchmod(fd.get(), 0600) != 0) throw_os_error("fchmod " + name, errno);
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
      int e = errno;
      if (e == ENOSPC || e == EFBIG || e == ENOMEM)
        throw CoreError(ErrorKind::kPoolFull,
                        "cannot size " + name + " to " + std::to_string(size) + " bytes", e);
      throw_os_error("ftruncate " + name, e);
    }
    // Reserve the pages now. Without this, tmpfs hands out pages lazily and
    // a full /dev/shm kills the process with SIGBUS at the first touch.
    int e;
    do {
      e = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(reserve_bytes));
    } while (e == EINTR);
    if (e == ENOSPC || e == ENOMEM || e == EFBIG)
      throw CoreError(
          ErrorKind::kPoolFull,
          "/dev/shm has no room for a segment of " + std::to_string(reserve_bytes) + " bytes", e);
    if (e != 0 && e != EOPNOTSUPP && e != EINVAL) throw_os_error("fallocate " + name, e);
    *out = Mapping(map_fd(fd.get(), size, name), size);
  } catch (...) {
    ::shm_unlink(name.c_str());
    throw;
  }
  if (fd_out) *fd_out = std::move(fd);
  return CreateResult::kCreated;
}

void check_own_segment(const std::string& name, const struct stat& st) {
  // Another local user can create a file under one of our names first (they
  // are visible in /dev/shm), or hand us a file of theirs through a link:
  // mapping it would let them read and write our arrays. Only a regular
  // file that this user owns and that nobody else may open is a segment.
  auto refuse = [&](const std::string& why) {
    throw CoreError(ErrorKind::kPool,
                    "refusing to use /dev/shm" + name + ": " + why +
                        " (pyarraypool makes every segment a regular file of its own user with "
                        "mode 0600; another user may have made this one to read or change the "
                        "pool's arrays)");
  };
  if (!S_ISREG(st.st_mode)) refuse("it is not a regular file");
  if (st.st_uid != ::geteuid())
    refuse("it is owned by uid " + std::to_string(st.st_uid) + ", not by this process's uid " +
           std::to_string(::geteuid()));
  if ((st.st_mode & 07777) != 0600) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    refuse(std::string("its mode is ") + mode + ", not 0600");
  }
}

bool owned_segment_entry(const std::string& entry) {
  struct stat st;
  return ::lstat(("/dev/shm/" + entry).c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
         st.st_uid == ::geteuid();
}

void reserve_range(int fd, uint64_t offset, uint64_t bytes) {
  int e;
  do {
    e = ::posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
  } while (e == EINTR);
  if (e == ENOSPC || e == ENOMEM || e == EFBIG)
    throw CoreError(ErrorKind::kPoolFull,
                    "/dev/shm has no room for " + std::to_string(bytes) + " more bytes", e);
  if (e != 0 && e != EOPNOTSUPP && e != EINVAL) throw_os_error("fallocate", e);
}

bool open_segment(const std::string& name, uint64_t expected_size, uint64_t min_size, Mapping* out,
                  UniqueFd* fd_out) {
  int raw;
  do {
    // O_NOFOLLOW: a symbolic link under our name is refused (ELOOP), never
    // followed to a file someone else chose.
    raw = ::shm_open(name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) {
    if (errno == ENOENT) return false;
    if (errno == ELOOP)
      throw CoreError(ErrorKind::kPool,
                      "refusing to use /dev/shm" + name + ": it is a symbolic link");
    throw_os_error("shm_open " + name, errno);
  }
  UniqueFd fd(raw);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw_os_error("fstat " + name, errno);
  check_own_segment(name, st);  // on the descriptor: what we checked is what we map
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if ((expected_size && size != expected_size) || size < min_size || size == 0)
    throw CoreError(ErrorKind::kPool,
                    "segment " + name + " has an unexpected size " + std::to_string(size));
  *out = Mapping(map_fd(fd.get(), size, name), size);
  if (fd_out) *fd_out = std::move(fd);
  return true;
}

void unlink_segment(const std::string& name) {
  if (::shm_unlink(name.c_str()) != 0 && errno != ENOENT)
    throw_os_error("shm_unlink " + name, errno);
}

void unlink_all_quietly(const std::string& prefix) {
  for (const std::string& n : list_segments(prefix))
    if (owned_segment_entry(n)) ::shm_unlink(("/" + n).c_str());
}

std::vector<std::string> list_segments(const std::string& prefix) {
  std::vector<std::string> names;
  DIR* d = ::opendir("/dev/shm");
  if (!d) return names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.compare(0, prefix.size(), prefix) == 0) names.push_back(n);
  }
  ::closedir(d);
  return names;
}

}  // namespace pap
