// Removing the pools of programs that are gone (python -m pyarraypool clean,
// and every pool creation): a pool whose processes and root are all dead.

#include "core/pool_internal.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/errors.hpp"
#include "core/shm_segment.hpp"

namespace pap {

std::vector<std::string> Pool::clean_stale(bool dry_run, const std::string& keep_token) {
  std::vector<std::string> removed;
  const std::string prefix = kShmPrefix;
  std::vector<std::string> names = list_segments(prefix);
  auto token_of = [&](const std::string& n) { return n.substr(prefix.size(), kTokenHexLen); };
  const uint64_t now = monotonic_ns();
  for (const std::string& n : names) {
    if (n.size() != prefix.size() + kTokenHexLen) continue;  // control segments only
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    struct stat st;
    if (!owned_segment_entry(n) || ::lstat(("/dev/shm/" + n).c_str(), &st) != 0) continue;
    Mapping m;
    try {
      if (!open_segment("/" + n, 0, 0, &m)) continue;
    } catch (const CoreError&) {
      continue;  // not ours to judge (another user's, wrong mode, odd size)
    }
    bool dead;
    if (m.size() < sizeof(ControlHeader)) {
      dead = ::time(nullptr) - st.st_mtime > 10;
    } else {
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      if (h->magic.load(std::memory_order_acquire) != kMagic) {
        dead = ::time(nullptr) - st.st_mtime > 10;
      } else if (h->layout_version != kLayoutVersion) {
        continue;  // another build's layout: its table cannot be read here
      } else {
        // A pool whose program's root still runs is that program's to
        // remove (leave() may have kept it for the root).
        dead = h->root_left.load() != 0 || !root_alive(h->root);
        for (uint32_t i = 0; i < kMaxSlots && dead; ++i)
          if (uint64_t id = h->table.slots[i].id.load();
              id != 0 && !is_observer(id) && h->table.alive(i, now))
            dead = false;
      }
    }
    if (!dead) continue;
    if (m.size() >= sizeof(ControlHeader) && !dry_run) {
      // The same handshake as leave(): mark it dead, then look again for a
      // process that attached meanwhile.
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      h->state.store(kStateDead, std::memory_order_seq_cst);
      for (uint32_t i = 0; i < kMaxSlots && dead; ++i)
        if (uint64_t id = h->table.slots[i].id.load(std::memory_order_seq_cst);
            id != 0 && !is_observer(id) && h->table.alive(i, now))
          dead = false;
      if (!dead) {
        h->state.store(kStateRunning, std::memory_order_seq_cst);
        continue;
      }
    }
    // Only our own files: another user may have put one under this pool's
    // name (root could unlink it, sticky /dev/shm or not).
    for (const std::string& other : names)
      if (other.compare(0, n.size(), n) == 0 && owned_segment_entry(other)) {
        removed.push_back(other);
        if (!dry_run) ::shm_unlink(("/" + other).c_str());  // best effort
      }
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
