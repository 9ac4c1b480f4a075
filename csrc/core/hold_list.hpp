// What one process holds: its hold list in shared memory, and this
// process's index of it.
//
// A block header counts its holders (`holders`) but does not say who they
// are: a bit per process in every header would cap the pool at a few
// hundred processes. Instead each process slot owns a hold list, an array
// of HoldEntry: first in the slot's own page of the control segment (room
// for kInlineHolds entries), and once that is full in a block of the pool
// (flagged kFlagHoldList) named by the slot (ProcessSlot::holds_ref), which
// doubles as needed. A process adds an entry when it
// takes a hold (allocate, load a handle, a fork child's inheritance) and
// clears it when it drops the hold, in the same critical section that
// changes the block's count. When a process dies, a survivor walks its list
// to learn what it held.
//
// The counts are derived data: repair after a dead lock owner recounts
// every block from the lists of the live slots, so a process killed between
// writing an entry and changing a count leaves nothing wrong behind. Every
// entry is checked against the block it names (segment, offset, used,
// generation) before it is believed, like a handle.
//
// HoldIndex is private to the process: block -> entry, so that dropping a
// hold does not search the list. A fork child starts with a copy of its
// parent's list at the same positions, so an inherited index stays valid.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/block_header.hpp"

namespace pap {

struct HoldEntry {
  uint64_t ref_bits;  // BlockRef::kNilBits: an unused entry
  uint64_t generation;
};
static_assert(sizeof(HoldEntry) == 16);

// Open addressing with linear probing over a power-of-two table; keys are
// BlockRef bits (never nil). Erase shifts later entries back, so there are
// no tombstones and lookups stay short.
// One hold of this process: where its entry is, and the block's generation
// (so that a fork child that must take its holds anew can tell whether an
// inherited block is still the one its arrays were made on).
struct HoldRef {
  uint64_t generation;
  uint32_t entry;
};

class HoldIndex {
 public:
  const HoldRef* find(uint64_t key) const {
    if (size_ == 0) return nullptr;
    for (uint64_t i = home(key);; i = (i + 1) & mask_) {
      if (keys_[i] == key) return &values_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }
  void insert(uint64_t key, HoldRef value);         // key not present
  void erase(uint64_t key) { take(key, nullptr); }  // no-op if absent
  // Erases `key` and gives its value (one probe sequence, not two); false if
  // absent.
  bool take(uint64_t key, HoldRef* out);
  void clear();
  uint32_t size() const { return size_; }
  template <class F>
  void for_each(F&& f) const {
    for (uint64_t i = 0; keys_ && i <= mask_; ++i)
      if (keys_[i] != kEmpty) f(keys_[i], values_[i]);
  }

 private:
  static constexpr uint64_t kEmpty = BlockRef::kNilBits;
  uint64_t home(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> shift_; }
  void grow();

  std::unique_ptr<uint64_t[]> keys_;
  std::unique_ptr<HoldRef[]> values_;
  uint64_t mask_ = 0;
  int shift_ = 64;
  uint32_t size_ = 0;
};

}  // namespace pap
