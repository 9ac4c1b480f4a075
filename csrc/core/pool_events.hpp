// Things a process's maintenance did to the pool that the user should hear
// about: it reclaimed what a dead process held, or it dropped pickles that
// were never loaded. The core records them in the Pool object (this
// process's memory, not the shared segment); the binding drains them and
// logs one record per event: a warning, unless the event is routine().
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace pap {

struct PoolEvent {
  enum class Kind { kReclaim, kExpiry };
  Kind kind = Kind::kReclaim;
  // kReclaim: the dead process (or, if `reserved`, the parent of a fork
  // child that died before attaching). kExpiry: the process that made the
  // newest pickle of the blocks; 0 if unknown.
  int pid = 0;
  bool reserved = false;
  // kReclaim: the dead process belonged to the reclaimer's own program
  // (ProcessSlot::program, both nonzero). The program stopped it (a pool's
  // terminate(), a worker it killed), or else learns of its death on its
  // own (a broken pool): nothing was lost that the program did not know of.
  bool same_program = false;
  // kReclaim: it died holding the pool lock, which was repaired.
  bool held_lock = false;
  uint64_t blocks = 0;      // kReclaim: blocks it held; kExpiry: blocks whose pickles expired
  uint64_t bytes = 0;       // their size, headers included
  uint64_t pickles = 0;     // kExpiry: pending counts dropped
  uint64_t age_ns = 0;      // kExpiry: age of the oldest of them
  uint64_t timeout_ns = 0;  // kExpiry: the pool's transfer_timeout
  // Of `bytes`, what went back to the pool because of this event. A block
  // freed for two reasons at once counts for its expiry if it expired,
  // else for the first of its dead holders.
  uint64_t freed_bytes = 0;
};

// The message logged for an event.
std::string describe(const PoolEvent& e);
// Whether the event is routine (logged at DEBUG): a reclaim from a process
// of the reclaimer's own program. Data may have been lost otherwise: an
// expired pickle, a process that died inside an operation on the pool (the
// lock was repaired), a process of another program (a pool shared by name,
// a Dask host pool), a process of no known program.
inline bool routine(const PoolEvent& e) {
  return e.kind == PoolEvent::Kind::kReclaim && e.same_program && !e.held_lock;
}

// A bounded, thread-safe queue of events. Recording never throws (it runs
// under the pool lock, in maintenance); past kMax queued events, further
// ones are counted and reported as one summary line.
class EventLog {
 public:
  static constexpr size_t kMax = 256;
  void push(const PoolEvent& e) noexcept;
  // Takes every queued event; `dropped` gets how many did not fit, and
  // `dropped_routine` (if given) how many of those were routine().
  std::vector<PoolEvent> drain(uint64_t* dropped, uint64_t* dropped_routine = nullptr);
  bool empty() const { return queued_.load(std::memory_order_relaxed) == 0; }

  // In a fork child (Pool::reset_events_after_fork): the queued events are
  // the parent's, which logs them, and another thread of the parent may have
  // been inside push() at the fork, leaving the mutex locked and the queue
  // half-changed. The child
  // starts afresh with neither (the old queue's memory, if any, is left
  // behind: touching it could be worse). Holding the mutex across fork
  // instead would deadlock: drain() takes it with the GIL held, which the
  // forking thread needs back before fork() returns.
  void reset_after_fork_child();

 private:
  std::mutex mutex_;
  std::vector<PoolEvent> events_;
  uint64_t dropped_ = 0;
  uint64_t dropped_routine_ = 0;
  std::atomic<size_t> queued_{0};
};

}  // namespace pap
