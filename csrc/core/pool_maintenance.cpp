// Maintenance under the lock: taking back what dead processes held and
// what expired pickles kept, with the events it reports; stats, snapshot,
// verify, and the test hooks that hold the lock.

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
#include "core/pool_snapshot.hpp"
#include "core/shm_segment.hpp"

namespace pap {

bool Pool::another_process_alive_locked() {
  // Stops at the first one: each question to the kernel walks the file's
  // list of locks, so counting them all, as every one of thousands of
  // processes leaves, would cost the square of their number.
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_seq_cst);
    if (id == 0 || is_observer(id) || i == slot_) continue;
    if (table().slots[i].exiting.load(std::memory_order_acquire)) continue;  // has left
    if (slot_alive(i)) return true;
  }
  return false;
}

uint32_t Pool::live_processes_locked(uint64_t, std::vector<int>* pids, bool count_me) {
  uint32_t n = 0;
  const std::vector<bool> hint = liveness_hint();
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t id = table().slots[i].id.load(std::memory_order_seq_cst);
    if (id == 0 || is_observer(id)) continue;
    if (i == slot_ && !count_me) continue;
    // A process past its exit_process() has left: it only keeps its holds
    // until it is gone, and never needs the pool again.
    if (table().slots[i].exiting.load(std::memory_order_acquire) && i != slot_) continue;
    if (!slot_alive_hinted(i, hint)) continue;
    ++n;
    if (pids && slot_kind(id) == SlotKind::kActive) pids->push_back(slot_pid(id));
  }
  return n;
}

namespace {

// What one maintenance walk takes back, gathered for its PoolEvents: per
// dead slot, and per sender of expired pickles. Filled before the
// allocator's rebuild; during it (where nothing may throw) only counters
// change.
struct ReclaimTally {
  static constexpr int kSenders = 8;
  uint64_t timeout_ns = 0;
  std::vector<PoolEvent> held;                        // one per dead slot, in `dead` order
  std::vector<bool> reported;                         // whether that reclaim is worth a warning
  std::unordered_map<uint64_t, size_t> first_holder;  // block -> its first dead holder
  PoolEvent expired[kSenders] = {};                   // per sender; the last one merges the rest
  int senders = 0;

  PoolEvent* credit_for(uint64_t ref_bits) {
    auto it = first_holder.find(ref_bits);
    return it == first_holder.end() ? nullptr : &held[it->second];
  }
  PoolEvent* expire(const BlockHeader& h, uint64_t size, uint64_t now) {
    const int pid = sender_of(h.flags);
    PoolEvent* e = nullptr;
    for (int i = 0; i < senders && !e; ++i)
      if (expired[i].pid == pid) e = &expired[i];
    if (!e && senders < kSenders) {
      e = &expired[senders++];
      e->pid = pid;
    }
    if (!e) {
      e = &expired[kSenders - 1];
      e->pid = 0;  // merged: several senders
    }
    ++e->blocks;
    e->bytes += size;
    e->pickles += h.pending;
    const uint64_t made =
        h.pending_deadline_ns > timeout_ns ? h.pending_deadline_ns - timeout_ns : 0;
    e->age_ns = std::max(e->age_ns, now > made ? now - made : 0);
    return e;
  }
  void report(EventLog& log) {
    for (size_t i = 0; i < held.size(); ++i)
      if (reported[i] && held[i].blocks != 0) log.push(held[i]);
    for (int i = 0; i < senders; ++i) {
      expired[i].kind = PoolEvent::Kind::kExpiry;
      expired[i].timeout_ns = timeout_ns;
      log.push(expired[i]);
    }
  }
};

}  // namespace

uint64_t Pool::maintain_locked(bool force_rebuild, int also_dead, uint64_t also_dead_id) {
  const uint64_t now = monotonic_ns();
  struct SlotRef {
    uint32_t slot;
    uint64_t id;
  };
  std::vector<SlotRef> dead, live;
  if (also_dead >= 0) dead.push_back({static_cast<uint32_t>(also_dead), also_dead_id});
  const std::vector<bool> hint = liveness_hint();
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id == 0 || static_cast<int>(i) == also_dead) continue;
    // kReleasingId: a live process is changing the slot; its list (if any)
    // is still its own.
    if (slot_alive_hinted(i, hint))
      live.push_back({i, id});
    else
      dead.push_back({i, id});
  }
  Counters& c = hdr_->counters;
  if (!force_rebuild && dead.empty() && (c.pending_blocks == 0 || now < c.next_expiry_ns)) return 0;

  // Every list is checked before anything changes: a slot that names
  // something other than its list means the shared memory is corrupt, and
  // nothing is freed on its word.
  struct List {
    HoldEntry* entries;
    uint32_t length;
  };
  auto list_of = [&](uint32_t slot) {
    uint32_t len, cap;
    HoldEntry* e = hold_list(slot, &len, &cap);
    return List{e, e ? len : 0};
  };
  std::vector<List> live_lists, dead_lists;
  std::unordered_set<uint64_t> named_lists;  // list blocks of live slots
  for (const SlotRef& s : live) {
    if (s.id == kReleasingId) {
      // Mid-change: its list is named by the slot all the same.
      const uint64_t bits = table().slots[s.slot].holds_ref.load(std::memory_order_acquire);
      if (bits != BlockRef::kNilBits) named_lists.insert(bits);
      continue;
    }
    live_lists.push_back(list_of(s.slot));
    if (live_lists.back().entries)
      named_lists.insert(table().slots[s.slot].holds_ref.load(std::memory_order_relaxed));
  }
  for (const SlotRef& s : dead)
    dead_lists.push_back(s.id == kReleasingId ? List{} : list_of(s.slot));

  auto tally = std::make_unique<ReclaimTally>();
  tally->timeout_ns = hdr_->config.transfer_timeout_ns;
  // The slot that died holding the pool lock, if this walk is its repair.
  const uint32_t repair = hdr_->needs_repair.load(std::memory_order_relaxed);
  const int64_t lock_owner = repair >= 1 && repair <= kMaxSlots ? int64_t{repair} - 1 : -1;
  for (size_t d = 0; d < dead.size(); ++d) {
    PoolEvent e;
    e.kind = PoolEvent::Kind::kReclaim;
    e.pid = slot_pid(dead[d].id);
    e.reserved = slot_kind(dead[d].id) == SlotKind::kReserved;
    e.same_program = program_ != 0 && table().slots[dead[d].slot].program.load(
                                          std::memory_order_relaxed) == program_;
    e.held_lock = dead[d].slot == lock_owner;
    const List& l = dead_lists[d];
    for (uint32_t i = 0; i < l.length; ++i) {
      if (const BlockHeader* h = held_block(l.entries[i])) {
        ++e.blocks;
        e.bytes += h->size();
        tally->first_holder.emplace(l.entries[i].ref_bits, d);
      }
    }
    tally->held.push_back(e);
    // A process that exited normally left its holds for us on purpose (it
    // could not drop them while its threads might still run): routine.
    // A leaver's own slot (also_dead_id 0) is no event either.
    const bool exited = table().slots[dead[d].slot].exiting.load(std::memory_order_acquire) != 0;
    tally->reported.push_back(!exited && dead[d].id != 0 && dead[d].id != kReleasingId &&
                              !(static_cast<int>(dead[d].slot) == also_dead && also_dead_id == 0));
  }

  // Recount every block's holders from the live lists: the counts are
  // derived, so whatever a dead process left half done is undone here.
  const uint32_t nsegs = published_segments();
  // The walk trusts the shared sizes, not this process's spans: a segment
  // retired by a process that died before bumping anything is skipped too.
  for (uint32_t i = 0; i < nsegs; ++i)
    if (hdr_->segment_sizes[i].load(std::memory_order_acquire) == 0) spans_[i].size = 0;
  Allocator a = allocator();
  for (uint32_t seg = 0; seg < nsegs && seg < mapped_.load(std::memory_order_acquire); ++seg)
    if (spans_[seg].size != 0)
      a.for_each_block(seg, [&](BlockRef ref, const BlockHeader& h) {
        if (h.used() && !(h.flags & kFlagHoldList)) a.header(ref)->holders = 0;
      });
  for (const List& l : live_lists)
    for (uint32_t i = 0; i < l.length; ++i)
      if (BlockHeader* h = held_block(l.entries[i])) ++h->holders;

  const uint64_t used_before = c.used_bytes;
  Counters fresh{};
  fresh.next_generation = c.next_generation;
  fresh.returned_bytes = c.returned_bytes;
  fresh.peak_used_bytes = c.peak_used_bytes;
  fresh.peak_window_ms = c.peak_window_ms;
  fresh.next_expiry_ns = ~uint64_t{0};
  auto keep = [&](BlockRef ref, BlockHeader& h) {
    const uint64_t size = h.size();
    if (h.flags & kFlagHoldList) {
      // A list nobody names any more: a dead slot's, or the old one of a
      // list its owner was growing when it died.
      const bool named = named_lists.count(ref.bits()) != 0;
      if (named) fresh.used_bytes += size;
      return named;
    }
    PoolEvent* credit = tally->credit_for(ref.bits());
    if (h.pending > 0 && now >= h.pending_deadline_ns) {
      credit = tally->expire(h, size, now);
      h.pending = 0;
    }
    if (h.holders == 0 && h.pending == 0) {
      if (credit) credit->freed_bytes += size;
      return false;
    }
    fresh.used_bytes += size;
    ++fresh.live_blocks;
    fresh.pending_transfers += h.pending;
    if (h.pending > 0) {
      ++fresh.pending_blocks;
      fresh.next_expiry_ns = std::min(fresh.next_expiry_ns, h.pending_deadline_ns);
    }
    return true;
  };
  a.rebuild(nsegs, keep, coarse_now_ms());
  for (uint32_t i = 0; i < nsegs; ++i)
    fresh.capacity_bytes += hdr_->segment_sizes[i].load(std::memory_order_relaxed);
  c = fresh;
  if (c.used_bytes < used_before) note_freed_locked();
  for (const SlotRef& s : dead)
    if (s.id != kReleasingId && s.slot != slot_) table().release_if(s.slot, s.id);
  tally->report(events_);
  return used_before > c.used_bytes ? used_before - c.used_bytes : 0;
}

uint64_t Pool::collect() {
  uint64_t freed;
  {
    Guard g(*this, Mode::kSlow);
    const uint64_t used_before = hdr_->counters.used_bytes;
    drain_cache_locked();
    const uint64_t cached = used_before - hdr_->counters.used_bytes;
    freed = observer_ ? cached : cached + maintain_locked(false);
  }
  return_idle_memory();
  return freed;
}

PoolStats Pool::stats() {
  return_idle_memory();
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();  // this process's accounting is exact
  if (!observer_) maintain_locked(false);
  PoolStats s;
  stats_locked(&s);
  return s;
}

PoolSnapshot Pool::snapshot() {
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();
  if (!observer_) maintain_locked(false);
  PoolSnapshot s;
  snapshot_locked(&s);
  return s;
}

void Pool::snapshot_locked(PoolSnapshot* s) {
  stats_locked(&s->stats);
  s->instance = instance_id();
  s->created_realtime_ns = hdr_->created_realtime_ns;
  SnapshotBuilder b(monotonic_ns(), hdr_->config.transfer_timeout_ns);
  Allocator a = allocator();
  const uint32_t nsegs = published_segments();
  for (uint32_t seg = 0; seg < nsegs && seg < mapped_.load(std::memory_order_acquire); ++seg)
    if (spans_[seg].size != 0)
      a.for_each_block(seg, [&](BlockRef, const BlockHeader& h) { b.add_block(h); });
  // Live slots only: maintenance has just freed the dead ones' (stats_locked
  // has the same view in `pids`). What each holds comes from its list.
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id == 0 || id == kReleasingId || is_observer(id) || !slot_alive(i)) continue;
    uint64_t blocks = 0, bytes = 0;
    uint32_t len, cap;
    const HoldEntry* list = hold_list(i, &len, &cap);
    for (uint32_t e = 0; list && e < len; ++e)
      if (const BlockHeader* h = held_block(list[e])) {
        ++blocks;
        bytes += h->size();
      }
    b.add_slot(i, id, blocks, bytes);
  }
  b.finish(s);
}

void Pool::stats_locked(PoolStats* out) {
  PoolStats& s = *out;
  s.token = token_;
  const Counters& c = hdr_->counters;
  s.capacity_bytes = c.capacity_bytes;
  s.used_bytes = c.used_bytes;
  s.live_blocks = c.live_blocks;
  s.pending_transfers = c.pending_transfers;
  s.pending_blocks = c.pending_blocks;
  s.segments = hdr_->segment_count.load();
  s.config = config();
  s.returned_bytes = c.returned_bytes;
  s.reserved_bytes = reserved_bytes_locked();
  s.processes = live_processes_locked(monotonic_ns(), &s.pids);
  s.free_bytes = c.capacity_bytes - c.used_bytes;
  s.largest_free_block = allocator().largest_free();
}

void Pool::verify() {
  Guard g(*this, Mode::kSlow);
  uint32_t nsegs = published_segments();
  Allocator a = allocator();
  a.verify(nsegs);
  Counters sum{};
  for (uint32_t seg = 0; seg < nsegs; ++seg) {
    sum.capacity_bytes += spans_[seg].size;
    a.for_each_block(seg, [&](BlockRef, const BlockHeader& h) {
      if (!h.used()) return;
      sum.used_bytes += h.size();
      if (h.flags & kFlagHoldList) return;
      ++sum.live_blocks;
      sum.pending_transfers += h.pending;
      sum.pending_blocks += h.pending > 0;
      if (h.holders == 0 && h.pending == 0)
        throw CoreError(ErrorKind::kPool, "a used block has no holder and no pending pickle");
    });
  }
  // Each block's count is the number of lists that name it: the live
  // slots', and those of dead slots nobody has reclaimed yet.
  std::unordered_map<uint64_t, uint32_t> named;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id == 0 || id == kReleasingId) continue;
    uint32_t len, cap;
    const HoldEntry* list = hold_list(i, &len, &cap);
    for (uint32_t e = 0; list && e < len; ++e)
      if (held_block(list[e])) ++named[list[e].ref_bits];
  }
  for (uint32_t seg = 0; seg < nsegs; ++seg)
    a.for_each_block(seg, [&](BlockRef ref, const BlockHeader& h) {
      if (!h.used() || (h.flags & kFlagHoldList)) return;
      auto it = named.find(ref.bits());
      if (h.holders != (it == named.end() ? 0 : it->second))
        throw CoreError(ErrorKind::kPool, "a block's holder count disagrees with the hold lists");
    });
  const Counters& c = hdr_->counters;
  if (sum.capacity_bytes != c.capacity_bytes || sum.used_bytes != c.used_bytes ||
      sum.live_blocks != c.live_blocks || sum.pending_transfers != c.pending_transfers ||
      sum.pending_blocks != c.pending_blocks)
    throw CoreError(ErrorKind::kPool, "pool counters disagree with the blocks");
}

void Pool::hold_lock_for(uint64_t ns) {
  Guard g(*this, Mode::kSlow);
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

Pool::BlockInfo Pool::inspect_block(BlockRef ref) {
  Guard g(*this, Mode::kSlow);
  if (ref.seg() >= mapped_.load(std::memory_order_acquire) || spans_[ref.seg()].size == 0 ||
      ref.off() + kHeaderSize > spans_[ref.seg()].size)
    throw CoreError(ErrorKind::kInvalidHandle, "no such block");
  const BlockHeader* h = allocator().header(ref);
  std::vector<uint32_t> holder_slots;
  for (uint32_t i = 0; i < kMaxSlots && h->used(); ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id == 0 || id == kReleasingId || !slot_alive(i)) continue;
    uint32_t len, cap;
    const HoldEntry* list = hold_list(i, &len, &cap);
    for (uint32_t e = 0; list && e < len; ++e)
      if (list[e].ref_bits == ref.bits() && list[e].generation == h->generation) {
        holder_slots.push_back(i);
        break;
      }
  }
  return BlockInfo{h->used(),
                   h->size(),
                   h->generation,
                   h->holders,
                   std::move(holder_slots),
                   h->pending,
                   h->flags & kFlagBits,
                   h->check == header_check(ref.off(), h->generation, check_key_)};
}

void Pool::lock_forever() {
  ensure_mapped();
  TableProbe probe(*this);
  futex_lock::lock(hdr_->lock, slot_ + 1, probe);
}

}  // namespace pap
