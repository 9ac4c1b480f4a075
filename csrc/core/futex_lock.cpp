#include "core/futex_lock.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>

namespace pap {

int futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, int64_t timeout_ns) {
  // A relative timeout with FUTEX_WAIT is measured on CLOCK_MONOTONIC.
  timespec ts{static_cast<time_t>(timeout_ns / 1'000'000'000),
              static_cast<long>(timeout_ns % 1'000'000'000)};
  // Not FUTEX_WAIT_PRIVATE: the word is in memory shared between processes.
  long r = syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected,
                   timeout_ns >= 0 ? &ts : nullptr, nullptr, 0);
  // EINTR and EAGAIN both mean "look at the word again": the caller loops.
  return r == 0 ? 0 : -errno;
}

int futex_wake(std::atomic<uint32_t>* addr, int count) {
  long r =
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, count, nullptr, nullptr, 0);
  return r >= 0 ? 0 : -errno;
}

namespace futex_lock {
namespace {

int64_t monotonic_now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

Acquired lock(LockWord& w, uint32_t me, OwnerProbe& probe, int64_t probe_after_ns) {
  // Short spin with exponential back-off: critical sections are a few
  // hundred nanoseconds, so most waits end here without a system call.
  for (int round = 0, pauses = 1; round < 12; ++round, pauses *= 2) {
    uint32_t v = w.load(std::memory_order_relaxed);
    if (v == 0 && try_lock(w, me)) return Acquired::kClean;
    for (int i = 0; i < pauses && i < 256; ++i) cpu_relax();
  }
  // The end of the current slice (0: none), and the word it watches. A
  // slice is a deadline on CLOCK_MONOTONIC, not a timeout restarted by
  // every wake-up: a signal interrupting the wait every millisecond (an
  // interval timer without SA_RESTART) would otherwise keep the probe, and
  // the takeover of a dead owner, from ever happening.
  int64_t slice_end = 0;
  uint32_t slice_word = 0;
  for (;;) {
    uint32_t v = w.load(std::memory_order_relaxed);
    if (v == 0) {
      // Keep the contended bit: others may still sleep on the word, and the
      // next unlock must wake them.
      uint32_t expected = 0;
      if (w.compare_exchange_strong(expected, me | kContended, std::memory_order_acquire,
                                    std::memory_order_relaxed))
        return Acquired::kClean;
      continue;
    }
    if (!(v & kContended)) {
      if (!w.compare_exchange_weak(v, v | kContended, std::memory_order_relaxed)) continue;
      v |= kContended;
    }
    const int64_t now = monotonic_now_ns();
    if (slice_end == 0 || v != slice_word) {  // a new owner or state: a new slice
      slice_end = now + probe_after_ns;
      slice_word = v;
    }
    int r = now < slice_end ? futex_wait(&w, v, slice_end - now) : -ETIMEDOUT;
    if (r != -ETIMEDOUT) continue;  // woken, changed, or interrupted: the deadline stands
    slice_end = 0;
    // Slept a whole slice with the word unchanged: is its owner still there?
    if (w.load(std::memory_order_relaxed) != v) continue;
    if (probe.owner_alive(owner_of(v))) continue;
    uint32_t expected = v;
    if (w.compare_exchange_strong(expected, me | kContended, std::memory_order_acquire,
                                  std::memory_order_relaxed))
      return Acquired::kFromDeadOwner;
  }
}

void unlock(LockWord& w) {
  uint32_t old = w.exchange(0, std::memory_order_release);
  if (old & kContended) futex_wake(&w, 1);
}

}  // namespace futex_lock
}  // namespace pap
