// Hold lists: what each process slot holds (hold_list.hpp). Everything here
// runs under the pool lock.

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"

namespace pap {

HoldEntry* Pool::hold_list(uint32_t slot, uint32_t* length, uint32_t* capacity) {
  *length = 0;
  *capacity = 0;
  const ProcessSlot& s = table().slots[slot];
  const uint64_t bits = s.holds_ref.load(std::memory_order_acquire);
  if (bits == BlockRef::kNilBits) {
    // The slot's own page of the control segment (reserved when claimed).
    const uint32_t len = s.holds_length.load(std::memory_order_relaxed);
    const uint32_t room = s.inline_capacity.load(std::memory_order_acquire);
    if (len > room || room > kInlineHolds)
      throw CoreError(ErrorKind::kPool, "process slot " + std::to_string(slot) +
                                            " has a hold list longer than its room: the pool's "
                                            "shared memory is corrupt");
    *length = len;
    *capacity = room;
    return reinterpret_cast<HoldEntry*>(control_.data() + slot_page_offset(slot));
  }
  // Shared memory is input: the reference is checked like a handle's
  // before it becomes a pointer.
  const BlockRef ref = BlockRef::from_bits(bits);
  const uint32_t seg = ref.seg();
  const uint64_t seg_size = seg < mapped_.load(std::memory_order_acquire) ? spans_[seg].size : 0;
  const BlockHeader* h = nullptr;
  if (seg_size != 0 && ref.off() % kAlign == 0 && ref.off() + kHeaderSize <= seg_size) {
    h = allocator().header(ref);
    if (!h->used() || !(h->flags & kFlagHoldList) || h->list_owner != slot + 1 ||
        h->size() > seg_size - ref.off() || h->size() < kHeaderSize)
      h = nullptr;
  }
  const uint32_t len = s.holds_length.load(std::memory_order_relaxed);
  if (!h || len > h->capacity() / sizeof(HoldEntry))
    throw CoreError(ErrorKind::kPool, "process slot " + std::to_string(slot) +
                                          " names a hold list that is not there: the pool's "
                                          "shared memory is corrupt");
  *length = len;
  *capacity = static_cast<uint32_t>(
      std::min<uint64_t>(h->capacity() / sizeof(HoldEntry), uint64_t{1} << 31));
  return reinterpret_cast<HoldEntry*>(const_cast<BlockHeader*>(h)->payload());
}

HoldEntry* Pool::my_list(uint32_t* length, uint32_t* capacity) {
  // This process's own list, checked once and then remembered for as long
  // as the slot names the same place (allocate and release pass here).
  const ProcessSlot& s = table().slots[slot_];
  const uint64_t bits = s.holds_ref.load(std::memory_order_acquire);
  if (my_list_ && bits == my_list_bits_ && slot_ == my_list_slot_) {
    *length = s.holds_length.load(std::memory_order_relaxed);
    *capacity = my_list_capacity_;
    if (*length > *capacity)
      throw CoreError(ErrorKind::kPool,
                      "this process's hold list is longer than its room: the "
                      "pool's shared memory is corrupt");
    return my_list_;
  }
  my_list_ = hold_list(slot_, length, capacity);
  my_list_bits_ = bits;
  my_list_slot_ = slot_;
  my_list_capacity_ = *capacity;
  return my_list_;
}

BlockHeader* Pool::held_block(const HoldEntry& e) {
  if (e.ref_bits == BlockRef::kNilBits) return nullptr;
  BlockHeader* h = find_header(BlockRef::from_bits(e.ref_bits), e.generation);
  return h && !(h->flags & kFlagHoldList) ? h : nullptr;
}

std::optional<BlockRef> Pool::allocate_list_locked(uint32_t owner, uint32_t capacity, Mode mode) {
  Counters& c = hdr_->counters;
  const uint64_t block_size = Allocator::block_size_for(uint64_t{capacity} * sizeof(HoldEntry));
  Allocator a = allocator();
  Reserver reserver(*this, mode, block_size - kHeaderSize);
  const BlockRef ref =
      a.allocate(block_size, UsedInit{c.next_generation, owner + 1, kFlagHoldList}, &reserver);
  if (ref.nil()) return std::nullopt;
  ++c.next_generation;
  c.used_bytes += a.header(ref)->size();  // bookkeeping: used, though no array
  return ref;
}

bool Pool::grow_hold_list_locked(uint32_t slot, uint32_t capacity, Mode mode) {
  std::optional<BlockRef> ref = allocate_list_locked(slot, capacity, mode);
  if (!ref && mode == Mode::kSlow) {
    if (maintain_locked(false) > 0) ref = allocate_list_locked(slot, capacity, mode);
    if (!ref) {
      const uint64_t bytes = uint64_t{capacity} * sizeof(HoldEntry);
      grow_locked(Allocator::block_size_for(bytes), bytes);
      ref = allocate_list_locked(slot, capacity, mode);
    }
  }
  if (!ref) return false;
  uint32_t len, cap;
  HoldEntry* old = hold_list(slot, &len, &cap);
  BlockHeader* h = allocator().header(*ref);
  std::memcpy(h->payload(), old, uint64_t{len} * sizeof(HoldEntry));
  // One store moves the slot to the new list (a process killed on either
  // side of it leaves one whole list named, and the other block unnamed,
  // which repair frees).
  ProcessSlot& s = table().slots[slot];
  const uint64_t old_bits = s.holds_ref.load(std::memory_order_relaxed);
  s.holds_length.store(len, std::memory_order_relaxed);
  s.holds_ref.store(ref->bits(), std::memory_order_release);
  if (old_bits != BlockRef::kNilBits) {
    const BlockRef old_ref = BlockRef::from_bits(old_bits);
    hdr_->counters.used_bytes -= allocator().header(old_ref)->size();
    allocator().free(old_ref);
    note_freed_locked();
  }
  return true;
}

bool Pool::reserve_hold_locked(Mode mode) {
  uint32_t len, cap;
  my_list(&len, &cap);
  const int child = child_slot_.load(std::memory_order_relaxed);
  // While a fork is under way, entries are only appended, at the same
  // position in our list and the child's (see add_hold_locked).
  const bool room = len < cap || (child < 0 && !free_holds_.empty());
  if (!room && !grow_hold_list_locked(slot_, std::max<uint32_t>(2 * cap, 64), mode)) return false;
  if (child >= 0) {
    my_list(&len, &cap);
    uint32_t clen, ccap;
    hold_list(static_cast<uint32_t>(child), &clen, &ccap);
    if (ccap < cap && !grow_hold_list_locked(static_cast<uint32_t>(child), cap, mode)) return false;
  }
  return true;
}

void Pool::add_hold_locked(BlockRef ref, uint64_t generation, BlockHeader& h, bool counted) {
  uint32_t len, cap;
  HoldEntry* mine = my_list(&len, &cap);
  const int child = child_slot_.load(std::memory_order_relaxed);
  uint32_t entry;
  if (child < 0 && !free_holds_.empty()) {
    entry = free_holds_.back();
    free_holds_.pop_back();
  } else {
    entry = len;
  }
  // The entry before the length that makes it count: killed in between,
  // the hold is simply not there (and it was ours, a dead process's, anyway).
  mine[entry] = HoldEntry{ref.bits(), generation};
  if (entry == len) table().slots[slot_].holds_length.store(len + 1, std::memory_order_relaxed);
  if (!counted) ++h.holders;
  holds_.insert(ref.bits(), HoldRef{generation, entry});
  if (child >= 0) {
    // The child inherits the arrays on this block too.
    uint32_t clen, ccap;
    HoldEntry* theirs = hold_list(static_cast<uint32_t>(child), &clen, &ccap);
    theirs[entry] = HoldEntry{ref.bits(), generation};
    table().slots[child].holds_length.store(std::max(clen, entry + 1), std::memory_order_relaxed);
    ++h.holders;
  }
}

void Pool::drop_hold_locked(BlockRef ref, BlockHeader& h) {
  if (HoldRef r; holds_.take(ref.bits(), &r)) {
    const uint32_t entry = r.entry;
    uint32_t len, cap;
    HoldEntry* mine = my_list(&len, &cap);
    if (entry < len) mine[entry].ref_bits = BlockRef::kNilBits;
    free_holds_.push_back(entry);
    if (h.holders > 0) --h.holders;
    if (holds_.size() == 0) empty_hold_list_locked();
  }
  free_if_unused(ref, h);
}

void Pool::empty_hold_list_locked() {
  // Nothing held: start again at the top of the slot's page, and give back
  // a list block (memory follows what is held). Not while a fork is under
  // way: the child's list mirrors ours position by position.
  if (child_slot_.load(std::memory_order_relaxed) >= 0) return;
  ProcessSlot& s = table().slots[slot_];
  free_holds_.clear();
  s.holds_length.store(0, std::memory_order_relaxed);
  const uint64_t bits = s.holds_ref.load(std::memory_order_relaxed);
  if (bits == BlockRef::kNilBits || s.inline_capacity.load(std::memory_order_relaxed) == 0) return;
  s.holds_ref.store(BlockRef::kNilBits, std::memory_order_release);
  const BlockRef ref = BlockRef::from_bits(bits);
  hdr_->counters.used_bytes -= allocator().header(ref)->size();
  allocator().free(ref);
  note_freed_locked();
}

void Pool::drop_all_holds_locked() {
  uint32_t len, cap;
  HoldEntry* mine = hold_list(slot_, &len, &cap);
  for (uint32_t i = 0; i < len; ++i) {
    if (BlockHeader* h = held_block(mine[i])) {
      if (h->holders > 0) --h->holders;
      free_if_unused(BlockRef::from_bits(mine[i].ref_bits), *h);
    }
  }
  ProcessSlot& s = table().slots[slot_];
  const uint64_t bits = s.holds_ref.load(std::memory_order_relaxed);
  s.holds_length.store(0, std::memory_order_relaxed);
  s.holds_ref.store(BlockRef::kNilBits, std::memory_order_release);
  if (bits != BlockRef::kNilBits) {
    const BlockRef ref = BlockRef::from_bits(bits);
    hdr_->counters.used_bytes -= allocator().header(ref)->size();
    allocator().free(ref);
    note_freed_locked();
  }
  holds_.clear();
  free_holds_.clear();
}

bool Pool::copy_holds_to_child_locked(uint32_t child) {
  uint32_t len, cap;
  HoldEntry* mine = hold_list(slot_, &len, &cap);
  uint32_t clen, ccap;
  hold_list(child, &clen, &ccap);
  if (ccap < cap && !grow_hold_list_locked(child, cap, Mode::kSlow)) return false;
  HoldEntry* theirs = hold_list(child, &clen, &ccap);
  for (uint32_t i = 0; i < len; ++i) {
    if (BlockHeader* h = held_block(mine[i])) {
      theirs[i] = mine[i];
      ++h->holders;
    } else {
      theirs[i] = HoldEntry{BlockRef::kNilBits, 0};
    }
  }
  table().slots[child].holds_length.store(len, std::memory_order_relaxed);
  return true;
}

void Pool::rebuild_hold_index_locked() {
  // What we inherited, if we must take it anew: the index is our parent's.
  std::vector<std::pair<uint64_t, uint64_t>> inherited;
  if (rehold_inherited_) {
    inherited.reserve(holds_.size());
    holds_.for_each(
        [&](uint64_t key, const HoldRef& r) { inherited.emplace_back(key, r.generation); });
  }
  holds_.clear();
  free_holds_.clear();
  uint32_t len, cap;
  HoldEntry* mine = hold_list(slot_, &len, &cap);
  for (uint32_t i = 0; i < len; ++i) {
    if (mine[i].ref_bits != BlockRef::kNilBits && !holds_.find(mine[i].ref_bits)) {
      holds_.insert(mine[i].ref_bits, HoldRef{mine[i].generation, i});
      continue;
    }
    // A second entry for a block (the parent dropped it and took it again
    // during the fork: our copy has both) is a second count: give it back.
    if (BlockHeader* h = held_block(mine[i]); h && h->holders > 1) --h->holders;
    mine[i].ref_bits = BlockRef::kNilBits;
    free_holds_.push_back(i);
  }
  holds_stale_ = false;
  if (!rehold_inherited_) return;
  rehold_inherited_ = false;
  for (const auto& [bits, generation] : inherited) {
    BlockHeader* h = held_block(HoldEntry{bits, generation});
    if (!h) {
      // Freed between the fork and now: our arrays on it would show
      // whatever the block holds next. Better no access at all.
      detach_inherited("a block it inherited was freed before it could hold it");
      throw CoreError(ErrorKind::kPool,
                      "this fork child lost a block it inherited before it could hold it; "
                      "its pool arrays are no longer accessible");
    }
    if (holds_.find(bits)) continue;
    if (!reserve_hold_locked(Mode::kSlow)) {
      detach_inherited("no room for its hold list");
      throw CoreError(ErrorKind::kPool, "this fork child could not hold the blocks it inherited");
    }
    add_hold_locked(BlockRef::from_bits(bits), generation, *h, false);
  }
}

void Pool::detach_inherited(const char* why) noexcept {
  left_ = true;
  // Every later pool call raises; inherited arrays must not go on reading
  // memory that other processes may reuse: make it inaccessible, keeping
  // the address range reserved so that nothing else is mapped there.
  const uint32_t n = mapped_.load(std::memory_order_acquire);
  for (uint32_t i = 0; i < n; ++i)
    if (spans_[i].base && spans_[i].size)
      ::mmap(spans_[i].base, spans_[i].size, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1,
             0);
  // Said once, on stderr: a pool error would come only at the next call.
  char msg[256];
  const int len =
      std::snprintf(msg, sizeof msg,
                    "pyarraypool: process %d could not attach to its pool (%s); its inherited "
                    "pool arrays are no longer accessible\n",
                    static_cast<int>(::getpid()), why);
  if (len > 0) {
    ssize_t ignored = ::write(2, msg, static_cast<size_t>(std::min(len, int(sizeof msg) - 1)));
    (void)ignored;
  }
}

}  // namespace pap
