// An allocator arena for the allocator tests, outside any pool, and what
// the tests read from it: the chain of blocks, verify()'s verdict.

#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "harness.hpp"

namespace pap::test {

// Segments and an AllocState in one region (heap, or a MAP_SHARED mapping
// for tests that kill a process mid-operation), laid out as a pool lays
// them out in shared memory, with canary bytes after every segment to catch
// a write past its end.
class Arena {
 public:
  static constexpr unsigned char kCanary = 0xA5;

  explicit Arena(const std::vector<uint64_t>& sizes, bool shared = false, size_t extra = 0);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // A byte-for-byte copy at another address: same refs, same blocks.
  std::unique_ptr<Arena> clone() const;

  void format();

  // Any fixed key: the arena is no pool.
  static constexpr uint64_t kCheckKey = 0x5EC7E7u;
  Allocator alloc() {
    return Allocator(*state_, spans_.data(), static_cast<uint32_t>(spans_.size()), kCheckKey);
  }
  AllocState& state() { return *state_; }
  uint32_t nsegs() const { return static_cast<uint32_t>(spans_.size()); }
  const SegmentSpan& span(uint32_t i) const { return spans_[i]; }
  uint64_t usable(uint32_t i) const { return spans_[i].size & kSizeMask; }
  void* extra() { return region_ + extra_at_; }

  bool canaries_ok() const;

 private:
  std::vector<uint64_t> sizes_;
  bool shared_;
  unsigned char* region_ = nullptr;
  size_t bytes_ = 0;
  uint64_t extra_at_ = 0;
  AllocState* state_ = nullptr;
  std::vector<SegmentSpan> spans_;
};

struct ChainBlock {
  uint64_t ref_bits;
  uint64_t size;
  bool used;
  uint64_t generation;  // 0 for free blocks
  bool operator==(const ChainBlock& o) const {
    return ref_bits == o.ref_bits && size == o.size && used == o.used && generation == o.generation;
  }
};

std::vector<ChainBlock> chain_of(Arena& ar);

// Allocator::verify's complaint, or "" when the arena is sound.
std::string verify_error(Arena& ar);

#define CHECK_VERIFY(arena)                                                                       \
  do {                                                                                            \
    std::string e_ = ::pap::test::verify_error(arena);                                            \
    if (!e_.empty()) ::pap::test::record_failure(__FILE__, __LINE__, "Allocator::verify: " + e_); \
  } while (0)

// True when segment `seg` is one free block covering all of it.
bool segment_is_empty(Arena& ar, uint32_t seg);

}  // namespace pap::test
