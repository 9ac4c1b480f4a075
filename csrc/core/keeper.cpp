#include "core/keeper.hpp"

#include <thread>

#include "core/pool.hpp"

namespace pap {

KeeperEnd keep_pool(const std::string& token, const std::string& instance,
                    std::chrono::milliseconds period) {
  for (;;) {
    switch (Pool::remove_if_abandoned(token, instance, /*dry_run=*/false, nullptr)) {
      case Pool::Fate::kRemoved:
        return KeeperEnd::kRemoved;
      case Pool::Fate::kGone:
        return KeeperEnd::kGone;
      case Pool::Fate::kInUse:
        break;
    }
    // A plain sleep rather than a wake-up on each process's death: the
    // processes of a pool come and go without telling the keeper, and a
    // look costs microseconds.
    std::this_thread::sleep_for(period);
  }
}

}  // namespace pap
