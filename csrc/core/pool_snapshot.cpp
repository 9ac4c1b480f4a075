#include "core/pool_snapshot.hpp"

#include <algorithm>
#include <cstdio>

#include "core/process_table.hpp"

namespace pap {

void SnapshotBuilder::add_block(const BlockHeader& h) {
  const uint64_t size = h.size();
  if (size == 0) return;
  SizeClassStats& c = classes_[63 - __builtin_clzll(size)];
  if (!h.used()) {
    ++c.free_blocks;
    c.free_bytes += size;
    return;
  }
  ++c.used_blocks;
  c.used_bytes += size;
  if (h.pending > 0) {
    PendingTransfer t;
    t.block_size = size;
    t.pickles = h.pending;
    // The deadline is the newest pickle's time plus the timeout.
    const uint64_t made = h.pending_deadline_ns > timeout_ ? h.pending_deadline_ns - timeout_ : 0;
    t.age_ns = now_ > made ? now_ - made : 0;
    t.expires_in_ns = h.pending_deadline_ns > now_ ? h.pending_deadline_ns - now_ : 0;
    t.sender_pid = sender_of(h.flags);
    pending_.push_back(t);
  }
}

void SnapshotBuilder::add_slot(uint32_t slot, uint64_t id, uint64_t blocks, uint64_t bytes) {
  if (id == 0 || id == kReleasingId) return;
  ProcessUsage u;
  u.pid = slot_pid(id);
  u.slot = slot;
  u.reserved = slot_kind(id) == SlotKind::kReserved;
  u.blocks = blocks;
  u.bytes = bytes;
  processes_.push_back(u);
}

void SnapshotBuilder::finish(PoolSnapshot* out) const {
  out->size_classes.clear();
  for (int i = 0; i < kClasses; ++i) {
    const SizeClassStats& c = classes_[i];
    if (c.used_blocks == 0 && c.free_blocks == 0) continue;
    SizeClassStats copy = c;
    copy.min_size = uint64_t{1} << i;
    out->size_classes.push_back(copy);
  }
  out->processes = processes_;
  std::stable_sort(out->processes.begin(), out->processes.end(),
                   [](const ProcessUsage& a, const ProcessUsage& b) { return a.bytes > b.bytes; });
  out->pending = pending_;
  std::stable_sort(
      out->pending.begin(), out->pending.end(),
      [](const PendingTransfer& a, const PendingTransfer& b) { return a.age_ns > b.age_ns; });
  out->pending_bytes = 0;
  for (const PendingTransfer& t : pending_) out->pending_bytes += t.block_size;
}

std::string human_bytes(uint64_t n) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (n < 1024) return std::to_string(n) + " B";
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

std::string human_seconds(uint64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(ns) / 1e9);
  return buf;
}

std::string describe_usage(const PoolSnapshot& s, size_t top) {
  std::string out;
  size_t shown = 0;
  uint64_t held_elsewhere = 0;
  for (const ProcessUsage& u : s.processes) {
    if (u.blocks == 0) continue;
    if (shown == top) {
      held_elsewhere += u.bytes;
      continue;
    }
    out += shown == 0 ? "held by " : ", ";
    out += (u.reserved ? "a fork child of pid " : "pid ") + std::to_string(u.pid) + ": " +
           human_bytes(u.bytes) + " (" + std::to_string(u.bytes) + " bytes) in " +
           std::to_string(u.blocks) + (u.blocks == 1 ? " block" : " blocks");
    ++shown;
  }
  if (held_elsewhere) out += ", other processes: " + human_bytes(held_elsewhere);
  if (shown == 0) out += "held by no process";
  if (s.pending.empty()) {
    out += "; no pickles pending";
  } else {
    uint64_t pickles = 0;
    for (const PendingTransfer& t : s.pending) pickles += t.pickles;
    out += "; " + std::to_string(pickles) + (pickles == 1 ? " pickle" : " pickles") +
           " pending (made, not loaded yet) on " + std::to_string(s.pending.size()) +
           (s.pending.size() == 1 ? " block" : " blocks") + " of " + human_bytes(s.pending_bytes) +
           " (" + std::to_string(s.pending_bytes) + " bytes), the oldest made " +
           human_seconds(s.pending.front().age_ns) + " ago (they expire after transfer_timeout=" +
           human_seconds(s.stats.config.transfer_timeout_ns) + ")";
  }
  return out;
}

}  // namespace pap
