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
  for (const std::string& n : names) {
    if (n.size() != prefix.size() + kTokenHexLen) continue;  // control segments only
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    struct stat st;
    if (::stat(("/dev/shm/" + n).c_str(), &st) != 0 || st.st_uid != ::geteuid()) continue;
    Mapping m;
    UniqueFd fd;
    try {
      if (!open_segment("/" + n, 0, 0, &m, &fd)) continue;
    } catch (const CoreError&) {
      continue;  // not ours to judge (permissions, odd size)
    }
    // Its processes are alive while they hold their slots' locks.
    auto anyone_alive = [&](const ControlHeader* h) {
      for (uint32_t i = 0; i < kMaxSlots; ++i)
        if (uint64_t id = h->table.slots[i].id.load(std::memory_order_seq_cst);
            id != 0 && !is_observer(id) && (id == kReleasingId || liveness::held_by_other(fd.get(), i)))
          return true;
      return false;
    };
    bool dead;
    if (m.size() < sizeof(ControlHeader)) {
      dead = ::time(nullptr) - st.st_mtime > 10;
    } else {
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      if (h->magic.load(std::memory_order_acquire) != kMagic) {
        dead = ::time(nullptr) - st.st_mtime > 10;
      } else if (h->layout_version != kLayoutVersion) {
        // Another version of pyarraypool made it: its processes' liveness
        // is not ours to judge, and reading its table with our layout would
        // call live processes dead.
        continue;
      } else {
        // A pool whose program's root still runs is that program's to
        // remove (leave() may have kept it for the root).
        dead = (h->root_left.load() != 0 || !root_alive(h->root)) && !anyone_alive(h);
      }
    }
    if (!dead) continue;
    if (m.size() >= sizeof(ControlHeader) && !dry_run) {
      // The same handshake as leave(): mark it dead, then look again for a
      // process that attached meanwhile.
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      h->state.store(kStateDead, std::memory_order_seq_cst);
      dead = !anyone_alive(h);
      if (!dead) {
        h->state.store(kStateRunning, std::memory_order_seq_cst);
        continue;
      }
    }
    for (const std::string& other : names)
      if (other.compare(0, n.size(), n) == 0) {
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
    if (::stat(("/dev/shm/" + prefix + token).c_str(), &st) == 0) continue;
    if (::stat(("/dev/shm/" + n).c_str(), &st) != 0 || st.st_uid != ::geteuid()) continue;
    bool listed = false;
    for (const auto& r : removed) listed |= r == n;
    if (listed || ::time(nullptr) - st.st_mtime <= 10) continue;
    removed.push_back(n);
    if (!dry_run) ::shm_unlink(("/" + n).c_str());  // best effort
  }
  return removed;
}

}  // namespace pap
