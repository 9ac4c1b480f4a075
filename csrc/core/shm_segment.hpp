// POSIX shared-memory segments: creation with reserved pages, opening,
// mapping, and the names pyarraypool gives them.
//
// Names are "/pyarraypool-<32 hex digits>" for a pool's control segment and
// "/pyarraypool-<32 hex digits>-<n>" for its data segment n. The 128-bit
// token comes from getrandom(), so names cannot be guessed; segments are
// created with mode 0600.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/liveness.hpp"

namespace pap {

constexpr const char* kShmPrefix = "pyarraypool-";
constexpr size_t kTokenHexLen = 32;

// An owned mapping of a whole segment; unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, uint64_t size) : addr_(addr), size_(size) {}
  Mapping(Mapping&& o) noexcept : addr_(o.addr_), size_(o.size_) { o.addr_ = nullptr; }
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  unsigned char* data() const { return static_cast<unsigned char*>(addr_); }
  uint64_t size() const { return size_; }
  explicit operator bool() const { return addr_ != nullptr; }
  // Keeps the pages mapped for the rest of the process (used at exit, when
  // Python objects may still point into them).
  void leak() { addr_ = nullptr; }

 private:
  void* addr_ = nullptr;
  uint64_t size_ = 0;
};

std::string random_token();  // 32 lowercase hex digits
// Fills `out` with `len` bytes from getrandom(). Throws CoreError.
void fill_random(void* out, size_t len);
// Lowercase hex of `len` bytes.
std::string to_hex(const unsigned char* bytes, size_t len);
bool valid_token(const std::string& token);
std::string control_name(const std::string& token);  // "/pyarraypool-<token>"
// ".../-<index>-<16 hex digits of nonce>". The nonce is random and kept in
// the (mode 0600) control segment: the control segment's name shows in
// /dev/shm, but another user cannot predict a data segment's name, so cannot
// create it first and block the pool's growth.
std::string data_name(const std::string& token, uint32_t index, uint64_t nonce);
uint64_t random_u64();

enum class CreateResult { kCreated, kExists };

// Creates a segment of `size` bytes with O_EXCL and mode 0600, reserves its
// pages (so that a full /dev/shm fails here with ENOSPC rather than with
// SIGBUS on first touch), and maps it. Throws kPoolFull on ENOSPC/ENOMEM.
// `fd_out`, if given, keeps the (O_CLOEXEC) descriptor. `reserve_bytes`,
// if not 0, reserves only the first bytes; the rest is reserved later with
// reserve_range() before it is first touched.
CreateResult create_segment(const std::string& name, uint64_t size, Mapping* out,
                            UniqueFd* fd_out = nullptr, uint64_t reserve_bytes = 0);
// Reserves the pages of [offset, offset + bytes) of a segment (kPoolFull if
// /dev/shm has no room for them).
void reserve_range(int fd, uint64_t offset, uint64_t bytes);

// Opens and maps an existing segment. Returns false if it does not exist.
// `expected_size` 0 accepts any size of at least `min_size`. Every segment
// is opened here, and only a regular file (not a symbolic link) owned by the
// effective uid with mode exactly 0600 is mapped: anything else under one of
// our names may be another user's, and throws kPool naming the file and what
// is wrong with it (see docs/threat_model.md). `fd_out`, if given, keeps the
// (O_CLOEXEC) descriptor.
bool open_segment(const std::string& name, uint64_t expected_size, uint64_t min_size, Mapping* out,
                  UniqueFd* fd_out = nullptr);

// Throws kPool unless `st` (of the segment `name`) is a regular file of the
// effective uid with mode 0600.
void check_own_segment(const std::string& name, const struct stat& st);
// True if /dev/shm/<entry> is a regular file (not followed if a link) of
// the effective uid: the only entries a listing may unlink.
bool owned_segment_entry(const std::string& entry);

// Unlinks a segment; a missing one is not an error.
void unlink_segment(const std::string& name);
// Unlinks every /dev/shm entry whose name starts with `prefix` and that
// belongs to this user, ignoring failures (best effort: used at exit).
void unlink_all_quietly(const std::string& prefix);

// Names (without the leading '/') of the entries in /dev/shm that start with
// `prefix`.
std::vector<std::string> list_segments(const std::string& prefix);

}  // namespace pap
