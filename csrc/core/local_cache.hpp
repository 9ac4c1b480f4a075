// This process's cache of small blocks it freed without ever sharing them.
//
// A block that this process allocated and that never left it (no handle was
// made for it, no fork happened while it was held) is known to nobody else:
// no other process can attach to it or hold it. Freeing it and allocating
// the same size again is the commonest pattern of all (temporaries in a
// loop), and going through the shared lock and allocator for it makes every
// process bounce the same cache lines. So such a block stays used, still
// named in this process's hold list, in a small local cache, and the next
// allocation of its size class takes it back without touching shared
// memory at all.
//
// Nothing is lost by it: a cached block is an ordinary used block held by
// this process, so if the process dies the survivors reclaim it as they
// reclaim everything it held. stats() and collect() empty the cache of the
// calling process first, so its own accounting is exact; other processes'
// caches (at most kMaxBytes each) count as used until they exit, allocate,
// or call stats()/collect().
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>

#include "core/allocator.hpp"
#include "core/block_header.hpp"

namespace pap {

class LocalCache {
 public:
  static constexpr uint64_t kMaxBlockSize = (uint64_t{64} << 10) + kHeaderSize;
  static constexpr uint64_t kMaxBytes = uint64_t{4} << 20;
  static constexpr uint32_t kPerClass = 8;

  // A cached block of at least `bytes` payload with these flags, if any.
  // Never waits: if another thread of this process is using the cache, it
  // returns nothing.
  std::optional<Block> take(uint64_t bytes, uint32_t flags);
  // Keeps `b` (unshared, held by this process); false if it does not fit.
  bool put(const Block& b);
  // Empties the cache, handing each block to `release`.
  template <class F>
  void drain(F&& release) {
    freeze();
    Thawed thawed{*this};  // also when `release` throws (a corrupt pool)
    drain_frozen(release);
  }
  // Keeps the other threads out (take() and put() give up) until thaw():
  // a fork empties the cache and copies this process's holds for the child
  // meanwhile, and no block may move into the cache in between (the child
  // would hold a block nothing of it refers to).
  void freeze() {
    while (busy_.test_and_set(std::memory_order_acquire)) {
    }
  }
  void thaw() { busy_.clear(std::memory_order_release); }
  // thaw() when the scope ends.
  struct Thawed {
    LocalCache& cache;
    ~Thawed() { cache.thaw(); }
  };
  // Empties the cache first, then hands each block to `release`: if one
  // throws, the cache is empty all the same, never half drained.
  template <class F>
  void drain_frozen(F&& release) {
    uint32_t n = 0;
    for (uint32_t c = 0; c < kClasses; ++c) {
      for (uint8_t i = 0; i < count_[c]; ++i) drained_[n++] = entries_[c][i];
      count_[c] = 0;
    }
    bytes_ = 0;
    for (uint32_t i = 0; i < n; ++i) release(drained_[i]);
  }
  // Forgets every entry without releasing it (a fork child: the entries
  // are its parent's).
  void forget() {
    for (auto& n : count_) n = 0;
    bytes_ = 0;
    busy_.clear();
  }
  uint64_t bytes() const { return bytes_; }

 private:
  static constexpr uint32_t kClasses = 7 * kSlCount;  // classes of blocks up to kMaxBlockSize
  static uint32_t class_of(uint64_t block_size);

  std::atomic_flag busy_ = ATOMIC_FLAG_INIT;
  uint8_t count_[kClasses] = {};
  Block entries_[kClasses][kPerClass] = {};
  Block drained_[kClasses * kPerClass] = {};  // drain_frozen's copy (no allocation there)
  uint64_t bytes_ = 0;
};

}  // namespace pap
