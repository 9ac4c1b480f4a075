// Removing the pools of programs that are gone (python -m pyarraypool clean,
// every pool creation, and each pool's keeper): a pool whose processes and
// root are all dead.

#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
#include "core/shm_segment.hpp"

namespace pap {

Pool::Fate Pool::remove_if_abandoned(const std::string& token, const std::string& instance,
                                     bool dry_run, std::vector<std::string>* removed,
                                     bool* decay_due) {
  if (!valid_token(token)) return Fate::kGone;
  const std::string name = std::string(kShmPrefix) + token;
  struct stat st;
  if (!owned_segment_entry(name) || ::lstat(("/dev/shm/" + name).c_str(), &st) != 0)
    return Fate::kGone;  // another user's, or not there
  Mapping m;
  UniqueFd fd;
  try {
    if (!open_segment("/" + name, 0, 0, &m, &fd)) return Fate::kGone;
  } catch (const CoreError&) {
    return Fate::kGone;  // not ours to judge (another user's, wrong mode, odd size)
  }
  // Its processes are alive while the kernel holds their slots' locks
  // (liveness.hpp); one that has run its exit has left already.
  auto anyone_alive = [&](const ControlHeader* hdr) {
    for (uint32_t i = 0; i < kMaxSlots; ++i) {
      const ProcessSlot& slot = hdr->table.slots[i];
      const uint64_t id = slot.id.load(std::memory_order_seq_cst);
      if (id == 0 || is_observer(id)) continue;
      if (id == kReleasingId) return true;
      if (!slot.exiting.load(std::memory_order_acquire) && liveness::held_by_other(fd.get(), i))
        return true;
    }
    return false;
  };
  // A control segment still being built (its creator died before publishing
  // it) has no valid header: abandoned once it is old enough.
  auto* h =
      m.size() >= sizeof(ControlHeader) ? reinterpret_cast<ControlHeader*>(m.data()) : nullptr;
  if (h && h->magic.load(std::memory_order_acquire) != kMagic) h = nullptr;
  if (!instance.empty() && (!h || to_hex(h->instance_id, sizeof h->instance_id) != instance))
    return Fate::kGone;  // removed, and maybe made again: not the pool the caller watches
  // Another build's layout: its table cannot be read here, and reading it
  // with ours would call live processes dead.
  if (h && h->layout_version != kLayoutVersion) return Fate::kInUse;
  bool dead;
  if (!h) {
    dead = ::time(nullptr) - st.st_mtime > 10;
  } else {
    // A pool whose program's root still runs is that program's to
    // remove (leave() may have kept it for the root).
    dead = (h->root_left.load() != 0 || !root_alive(h->root)) && !anyone_alive(h);
  }
  if (!dead) {
    if (decay_due && h) {
      const uint64_t due = h->decay_due_ms.load(std::memory_order_acquire);
      *decay_due = due != 0 && coarse_now_ms() >= due;
    }
    return Fate::kInUse;
  }
  if (h && !dry_run) {
    // The same handshake as leave(): mark it dead, then look again for a
    // process that attached meanwhile.
    h->state.store(kStateDead, std::memory_order_seq_cst);
    dead = !anyone_alive(h);
    if (!dead) {
      h->state.store(kStateRunning, std::memory_order_seq_cst);
      return Fate::kInUse;
    }
    // Its last process or another remover may have removed it since we
    // opened it, and a process of its program made a new pool under the
    // name: the names below would then be that pool's.
    Mapping again;
    try {
      if (!open_segment("/" + name, 0, 0, &again) || again.size() < sizeof(ControlHeader) ||
          std::memcmp(reinterpret_cast<const ControlHeader*>(again.data())->instance_id,
                      h->instance_id, sizeof h->instance_id) != 0)
        return Fate::kGone;
    } catch (const CoreError&) {
      return Fate::kGone;
    }
  }
  // Its data segments and any half-made control segment start with its
  // name. The control segment goes last: it stays the pool's index until
  // the end, so that a remover killed halfway leaves a pool that the next
  // cleaner (or keeper) finds and finishes removing.
  std::vector<std::string> names = list_segments(name);
  std::stable_partition(names.begin(), names.end(),
                        [&](const std::string& n) { return n != name; });
  for (const std::string& n : names) {
    // Only our own files: another user may have put one under this pool's
    // name (root could unlink it, sticky /dev/shm or not).
    if (!owned_segment_entry(n)) continue;
    if (removed) removed->push_back(n);
    if (!dry_run) ::shm_unlink(("/" + n).c_str());  // best effort
  }
  return Fate::kRemoved;
}

std::vector<std::string> Pool::clean_stale(bool dry_run, const std::string& keep_token) {
  std::vector<std::string> removed;
  const std::string prefix = kShmPrefix;
  std::vector<std::string> names = list_segments(prefix);
  auto token_of = [&](const std::string& n) { return n.substr(prefix.size(), kTokenHexLen); };
  for (const std::string& n : names) {
    if (n.size() != prefix.size() + kTokenHexLen) continue;  // control segments only
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    remove_if_abandoned(token, "", dry_run, &removed);
  }
  // Data segments whose control segment is gone.
  for (const std::string& n : names) {
    if (n.size() <= prefix.size() + kTokenHexLen) continue;
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    struct stat st;
    if (::lstat(("/dev/shm/" + prefix + token).c_str(), &st) == 0) continue;
    if (!owned_segment_entry(n) || ::lstat(("/dev/shm/" + n).c_str(), &st) != 0) continue;
    bool listed = false;
    for (const auto& r : removed) listed |= r == n;
    if (listed || ::time(nullptr) - st.st_mtime <= 10) continue;
    removed.push_back(n);
    if (!dry_run) ::shm_unlink(("/" + n).c_str());  // best effort
  }
  return removed;
}

}  // namespace pap
