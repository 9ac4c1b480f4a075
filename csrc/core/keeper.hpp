// The pool's keeper: a process of its own, started by the pool's creator,
// that removes the pool's files once every process of its program is dead
// (docs/design.md, "Keeper"). Without it, a program killed as a whole (a
// batch scheduler's SIGTERM to its process group, the OOM killer's SIGKILL
// of its last process) leaves its files in /dev/shm until the next pool
// creation or `python -m pyarraypool clean`.
//
// This is the keeper's loop. It is not one of the pool's processes: it
// claims no slot (so it never keeps a pool alive nor appears in stats) and
// maps only the control segment, for a moment at each look; only when free
// memory is due to go back (decay) does it attach as an observer, give it
// back and leave.
// Starting the process (spawn, signals, session, descriptors) is the
// binding's (csrc/binding/keeper.cpp).
#pragma once

#include <chrono>
#include <string>

namespace pap {

// Why keep_pool returned.
enum class KeeperEnd {
  kRemoved,  // the pool was abandoned: the keeper removed its files
  kGone,     // someone else removed it (its last process, a cleaner)
};

// How often the keeper looks: a killed program's files go within this
// (plus the time its processes take to die); each look costs a few system
// calls and, while the pool is in use, one /proc read.
inline constexpr std::chrono::milliseconds kKeeperPeriod{150};

// Every `period`, asks Pool::remove_if_abandoned (the decision clean_stale
// makes for one pool) about the pool `token` of instance `instance` (32 hex
// digits), and returns once that pool is removed, by this call or by
// anyone. Blocking; throws only what allocation may (std::bad_alloc).
KeeperEnd keep_pool(const std::string& token, const std::string& instance,
                    std::chrono::milliseconds period = kKeeperPeriod);

}  // namespace pap
