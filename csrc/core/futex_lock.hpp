// A process-shared lock in one 32-bit word of shared memory.
//
// The word holds the owner's id (a process slot number + 1, never 0) and a
// "contended" bit. Acquiring spins briefly with back-off, then sleeps on the
// futex of that word. The futex is shared (no FUTEX_PRIVATE_FLAG): waiters
// live in other processes.
//
// Because the owner is named in the word, a waiter that has slept for a
// while asks `owner_alive(owner)`; if the owner is dead (killed while inside
// the lock) the waiter takes the lock over with a CAS and is told so, and the
// caller must repair whatever the dead owner left half done before relying
// on the protected data.
#pragma once

#include <atomic>
#include <cstdint>

namespace pap {

using LockWord = std::atomic<uint32_t>;

enum class Acquired {
  kClean,          // the previous owner released normally
  kFromDeadOwner,  // taken over from a dead owner: protected data needs repair
};

class OwnerProbe {
 public:
  virtual ~OwnerProbe() = default;
  // Returns false only when `owner` is certainly dead.
  virtual bool owner_alive(uint32_t owner) = 0;
};

namespace futex_lock {

constexpr uint32_t kContended = 1u << 31;
constexpr uint32_t kOwnerMask = ~kContended;

inline uint32_t owner_of(uint32_t word) { return word & kOwnerMask; }

// One attempt, no waiting. `me` must be non-zero and fit kOwnerMask.
inline bool try_lock(LockWord& w, uint32_t me) {
  uint32_t expected = 0;
  return w.compare_exchange_strong(expected, me, std::memory_order_acquire,
                                   std::memory_order_relaxed);
}

// Blocks until the lock is ours. Sleeps on the futex in slices of
// `probe_after_ns`, each a deadline on CLOCK_MONOTONIC that wake-ups and
// signals (EINTR) do not extend; after each slice that ends with the same
// owner still in the word, asks the probe whether that owner is alive.
Acquired lock(LockWord& w, uint32_t me, OwnerProbe& probe, int64_t probe_after_ns = 10'000'000);

void unlock(LockWord& w);

}  // namespace futex_lock

// Thin wrappers over the futex system call; both return 0 or -errno and
// retry EINTR themselves where that is the right thing to do.
int futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, int64_t timeout_ns);
int futex_wake(std::atomic<uint32_t>* addr, int count);

}  // namespace pap
