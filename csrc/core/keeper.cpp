#include "core/keeper.hpp"

#include <thread>

#include "core/errors.hpp"
#include "core/pool.hpp"

namespace pap {

KeeperEnd keep_pool(const std::string& token, const std::string& instance,
                    std::chrono::milliseconds period) {
  for (;;) {
    bool decay_due = false;
    switch (Pool::remove_if_abandoned(token, instance, /*dry_run=*/false, nullptr, &decay_due)) {
      case Pool::Fate::kRemoved:
        return KeeperEnd::kRemoved;
      case Pool::Fate::kGone:
        return KeeperEnd::kGone;
      case Pool::Fate::kInUse:
        break;
    }
    // An idle program calls nothing, and its processes start no threads
    // (fork safety): the keeper gives back the memory that has stayed free
    // for the pool's decay time (Pool::return_idle_memory).
    if (decay_due) {
      try {
        Pool::return_idle_memory_of(token, instance);
      } catch (const CoreError&) {
        // The pool is being removed, or is corrupt: its own processes say so.
      }
    }
    // A plain sleep rather than a wake-up on each process's death: the
    // processes of a pool come and go without telling the keeper, and a
    // look costs microseconds.
    std::this_thread::sleep_for(period);
  }
}

}  // namespace pap
