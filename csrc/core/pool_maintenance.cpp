// Maintenance under the lock: taking back what dead processes held and
// what expired pickles kept, with the events it reports; stats, snapshot,
// verify, and the test hooks that hold the lock.

#include "core/pool_internal.hpp"

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>

#include "core/errors.hpp"
#include "core/pool_snapshot.hpp"
#include "core/shm_segment.hpp"

namespace pap {

uint32_t Pool::live_processes_locked(uint64_t now, std::vector<int>* pids, bool count_me) {
  uint32_t n = 0;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t id = table().slots[i].id.load(std::memory_order_seq_cst);
    if (id == 0 || is_observer(id)) continue;
    if (i == slot_ && !count_me) continue;
    if (i != slot_ && !table().alive(i, now)) continue;
    ++n;
    if (pids && slot_kind(id) == SlotKind::kActive) pids->push_back(slot_pid(id));
  }
  return n;
}

namespace {

// What one maintenance walk takes back, gathered for its PoolEvents: per
// dead slot, and per sender of expired pickles. Fixed-size: the walk runs
// inside the allocator's rebuild, where nothing may throw.
struct ReclaimTally {
  static constexpr int kSenders = 8;
  uint64_t timeout_ns;
  HolderMask reported{};             // dead slots whose reclaim is reported
  uint64_t ids[kMaxSlots] = {};      // their owners' ids
  PoolEvent held[kMaxSlots] = {};    // per dead slot
  PoolEvent expired[kSenders] = {};  // per sender; the last one merges the rest
  int senders = 0;

  // Counts block `h` (before its dead holders are cleared); returns the
  // event its freeing would be credited to.
  PoolEvent* reclaim(const BlockHeader& h, uint64_t size) {
    PoolEvent* first = nullptr;
    for (uint32_t w = 0; w < kMaxSlots / 64; ++w)
      for (uint64_t bits = h.holders.words[w] & reported.words[w]; bits; bits &= bits - 1) {
        PoolEvent& e = held[w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits))];
        ++e.blocks;
        e.bytes += size;
        if (!first) first = &e;
      }
    return first;
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
    for (uint32_t i = 0; i < kMaxSlots; ++i) {
      if (!reported.test(i) || held[i].blocks == 0) continue;
      held[i].kind = PoolEvent::Kind::kReclaim;
      held[i].pid = slot_pid(ids[i]);
      held[i].reserved = slot_kind(ids[i]) == SlotKind::kReserved;
      log.push(held[i]);
    }
    for (int i = 0; i < senders; ++i) {
      expired[i].kind = PoolEvent::Kind::kExpiry;
      expired[i].timeout_ns = timeout_ns;
      log.push(expired[i]);
    }
  }
};

}  // namespace

uint64_t Pool::maintain_locked(bool force_rebuild, const HolderMask& also_dead,
                               uint64_t also_dead_id) {
  const uint64_t now = monotonic_ns();
  HolderMask dead = also_dead;
  uint64_t dead_ids[kMaxSlots] = {};  // the id each slot had when judged dead
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (i == slot_ || id == 0 || also_dead.test(i)) continue;
    if (!table().alive(i, now)) {
      dead.set(i);
      dead_ids[i] = id;
    }
  }
  Counters& c = hdr_->counters;
  if (!force_rebuild && !dead.any() && (c.pending_blocks == 0 || now < c.next_expiry_ns)) return 0;

  // Heap, not stack: it is a few KiB and maintenance is rare.
  auto tally = std::make_unique<ReclaimTally>();
  tally->timeout_ns = hdr_->config.transfer_timeout_ns;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = dead_ids[i] ? dead_ids[i] : also_dead.test(i) ? also_dead_id : 0;
    if (id == 0 || id == kReleasingId) continue;
    tally->reported.set(i);
    tally->ids[i] = id;
  }
  const uint64_t used_before = c.used_bytes;
  Counters fresh{};
  fresh.next_generation = c.next_generation;
  fresh.next_expiry_ns = ~uint64_t{0};
  auto keep = [&](BlockRef, BlockHeader& h) {
    const uint64_t size = h.size();
    PoolEvent* credit = tally->reclaim(h, size);
    h.holders.clear_all(dead);
    if (h.pending > 0 && now >= h.pending_deadline_ns) {
      credit = tally->expire(h, size, now);
      h.pending = 0;
    }
    if (!h.holders.any() && h.pending == 0) {
      if (credit) credit->freed_bytes += size;
      return false;
    }
    fresh.used_bytes += h.size();
    ++fresh.live_blocks;
    fresh.pending_transfers += h.pending;
    if (h.pending > 0) {
      ++fresh.pending_blocks;
      fresh.next_expiry_ns = std::min(fresh.next_expiry_ns, h.pending_deadline_ns);
    }
    return true;
  };
  uint32_t nsegs = published_segments();
  // The walk trusts the shared sizes, not this process's spans: a segment
  // retired by a process that died before bumping anything is skipped too.
  for (uint32_t i = 0; i < nsegs; ++i)
    if (hdr_->segment_sizes[i].load(std::memory_order_acquire) == 0) spans_[i].size = 0;
  allocator().rebuild(nsegs, keep);
  for (uint32_t i = 0; i < nsegs; ++i)
    fresh.capacity_bytes += hdr_->segment_sizes[i].load(std::memory_order_relaxed);
  c = fresh;
  for (uint32_t i = 0; i < kMaxSlots; ++i)
    if (dead_ids[i] != 0) table().release_if(i, dead_ids[i]);
  tally->report(events_);
  return used_before > c.used_bytes ? used_before - c.used_bytes : 0;
}

uint64_t Pool::collect() {
  Guard g(*this, Mode::kSlow);
  const uint64_t used_before = hdr_->counters.used_bytes;
  drain_cache_locked();
  const uint64_t cached = used_before - hdr_->counters.used_bytes;
  return observer_ ? cached : cached + maintain_locked(false, HolderMask{});
}

PoolStats Pool::stats() {
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();  // this process's accounting is exact
  if (!observer_) maintain_locked(false, HolderMask{});
  PoolStats s;
  stats_locked(&s);
  return s;
}

PoolSnapshot Pool::snapshot() {
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();
  if (!observer_) maintain_locked(false, HolderMask{});
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
  // has the same view in `pids`).
  const uint64_t now = monotonic_ns();
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id != 0 && !is_observer(id) && (i == slot_ || table().alive(i, now))) b.add_slot(i, id);
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
  s.config = hdr_->config;
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
      ++sum.live_blocks;
      sum.pending_transfers += h.pending;
      sum.pending_blocks += h.pending > 0;
      if (!h.holders.any() && h.pending == 0)
        throw CoreError(ErrorKind::kPool, "a used block has no holder and no pending pickle");
    });
  }
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
  return BlockInfo{h->used(),
                   h->size(),
                   h->generation,
                   h->holders,
                   h->pending,
                   h->flags & kFlagBits,
                   h->check == header_check(ref.off(), h->generation, check_key_)};
}

void Pool::lock_forever() {
  ensure_mapped();
  TableProbe probe(table());
  futex_lock::lock(hdr_->lock, slot_ + 1, probe);
}

}  // namespace pap
