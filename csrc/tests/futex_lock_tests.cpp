// Futex lock tests: mutual exclusion between threads and between
// processes, the takeover of a dead owner's lock, a contended handoff.

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <new>
#include <thread>

#include "core/futex_lock.hpp"
#include "harness.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kFutexLock;

struct AlwaysAlive : OwnerProbe {
  bool owner_alive(uint32_t) override { return true; }
};

// Asks about one child process: dead once waitpid has reaped it.
struct ChildProbe : OwnerProbe {
  explicit ChildProbe(pid_t p) : pid(p) {}
  bool owner_alive(uint32_t owner) override {
    last_owner.store(owner);
    calls.fetch_add(1);
    if (!reaped) {
      int st;
      if (::waitpid(pid, &st, WNOHANG) == pid) reaped = true;
    }
    return !reaped;
  }
  pid_t pid;
  bool reaped = false;
  std::atomic<uint32_t> last_owner{0};
  std::atomic<int> calls{0};
};

// A read-modify-write with a gap between the read and the write, so that
// two holders of a broken lock lose updates reliably.
void slow_increment(uint64_t* counter) {
  volatile uint64_t* c = counter;
  uint64_t v = *c;
  for (int i = 0; i < 8; ++i) cpu_relax();
  *c = v + 1;
}

TEST(futex_lock_threads) {
  LockWord w{0};
  uint64_t counter = 0;
  std::atomic<int> unclean{0}, started{0};
  auto work = [&](uint32_t me) {
    AlwaysAlive probe;
    started.fetch_add(1);
    while (started.load() < 2) {
    }
    for (int i = 0; i < 1000000; ++i) {
      if (futex_lock::lock(w, me, probe) != Acquired::kClean) unclean.fetch_add(1);
      slow_increment(&counter);
      futex_lock::unlock(w);
    }
  };
  std::thread t1(work, 1), t2(work, 2);
  t1.join();
  t2.join();
  CHECK_EQ(counter, 2000000u);
  CHECK_EQ(unclean.load(), 0);
  CHECK_EQ(w.load(), 0u);
  // try_lock and owner_of.
  CHECK(futex_lock::try_lock(w, 5));
  CHECK(!futex_lock::try_lock(w, 6));
  CHECK_EQ(futex_lock::owner_of(w.load()), 5u);
  futex_lock::unlock(w);
  CHECK_EQ(w.load(), 0u);
}

TEST(futex_lock_processes) {
  struct Shared {
    LockWord w;
    std::atomic<uint32_t> started;
    uint64_t counter;
  };
  void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(m != MAP_FAILED);
  Shared* sh = static_cast<Shared*>(m);
  new (sh) Shared{};
  auto work = [sh](uint32_t me) {
    AlwaysAlive probe;
    sh->started.fetch_add(1);
    while (sh->started.load() < 2) {
    }
    for (int i = 0; i < 200000; ++i) {
      futex_lock::lock(sh->w, me, probe);
      slow_increment(&sh->counter);
      futex_lock::unlock(sh->w);
    }
  };
  pid_t pid = spawn([&] {
    work(2);
    return 0;
  });
  work(1);
  CHECK_EQ(wait_child(pid), 0);
  CHECK_EQ(sh->counter, 400000u);
  CHECK_EQ(sh->w.load(), 0u);
  ::munmap(m, 4096);
}

TEST(futex_lock_dead_owner_takeover) {
  void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(m != MAP_FAILED);
  auto* w = new (m) LockWord{0};
  Pipe ready;
  pid_t pid = spawn([&]() -> int {
    AlwaysAlive probe;
    futex_lock::lock(*w, 7, probe);
    char c = 1;
    write_all(ready.w, &c, 1);
    for (;;) ::pause();
  });
  ready.close_w();
  char c;
  REQUIRE(read_all(ready.r, &c, 1));
  CHECK(!futex_lock::try_lock(*w, 1));

  ChildProbe probe(pid);
  std::atomic<bool> done{false};
  Acquired how = Acquired::kClean;
  std::thread waiter([&] {
    how = futex_lock::lock(*w, 1, probe);
    done.store(true);
  });
  // While the owner lives, the waiter sleeps and keeps asking about it.
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  CHECK(!done.load());
  CHECK(probe.calls.load() >= 3);
  CHECK_EQ(probe.last_owner.load(), 7u);
  auto t0 = Clock::now();
  ::kill(pid, SIGKILL);
  while (!done.load() && seconds_since(t0) < 3)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const double took = seconds_since(t0);
  if (!done.load()) {
    record_failure(__FILE__, __LINE__, "the lock of a dead owner was not taken over");
    w->store(0);  // unstick the waiter
    futex_wake(w, 1);
  }
  waiter.join();
  CHECK(how == Acquired::kFromDeadOwner);
  CHECK(took < 2.0);
  CHECK_EQ(futex_lock::owner_of(w->load()), 1u);
  futex_lock::unlock(*w);
  CHECK_EQ(w->load(), 0u);
  if (!probe.reaped) wait_child(pid);
  AlwaysAlive alive;
  CHECK(futex_lock::lock(*w, 2, alive) == Acquired::kClean);
  futex_lock::unlock(*w);
  ::munmap(m, 4096);
}

// A 1 ms interval timer whose SIGALRM handler is installed without
// SA_RESTART interrupts every futex wait. Taking over a dead owner's lock
// must still happen within 50 ms of its death: the 10 ms slice between
// liveness probes is a deadline, not restarted by each interruption.
TEST(futex_lock_takeover_bounded_under_signals) {
  struct Shared {
    LockWord w;
    std::atomic<int64_t> died_ns;  // CLOCK_MONOTONIC, written by the owner just before it dies
  };
  void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(m != MAP_FAILED);
  auto* sh = new (m) Shared{};
  auto mono_ns = [] {
    timespec ts;
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  };
  Pipe ready;
  pid_t pid = spawn([&]() -> int {
    AlwaysAlive probe;
    futex_lock::lock(sh->w, 7, probe);
    char c = 1;
    write_all(ready.w, &c, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the waiter is asleep by now
    sh->died_ns.store(mono_ns());
    ::_exit(0);  // dies holding the lock
  });
  ready.close_w();
  char c;
  REQUIRE(read_all(ready.r, &c, 1));

  // Only this thread takes SIGALRM: the watchdog blocks it.
  sigset_t alrm;
  sigemptyset(&alrm);
  sigaddset(&alrm, SIGALRM);
  REQUIRE(::pthread_sigmask(SIG_BLOCK, &alrm, nullptr) == 0);
  std::atomic<bool> done{false}, stuck{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 3000 && !done.load(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (!done.load()) {  // unstick the waiter: the test has failed
      stuck.store(true);
      sh->w.store(0);
      futex_wake(&sh->w, 1);
    }
  });
  REQUIRE(::pthread_sigmask(SIG_UNBLOCK, &alrm, nullptr) == 0);
  static std::atomic<long> alarms{0};
  struct sigaction sa {
  }, old_sa{};
  sa.sa_handler = [](int) { alarms.fetch_add(1); };
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: the futex wait returns EINTR
  REQUIRE(::sigaction(SIGALRM, &sa, &old_sa) == 0);
  itimerval every_ms{{0, 1000}, {0, 1000}}, off{};
  REQUIRE(::setitimer(ITIMER_REAL, &every_ms, nullptr) == 0);
  alarms.store(0);

  ChildProbe probe(pid);
  const Acquired how = futex_lock::lock(sh->w, 1, probe);
  const int64_t got_ns = mono_ns();
  done.store(true);
  ::setitimer(ITIMER_REAL, &off, nullptr);
  ::sigaction(SIGALRM, &old_sa, nullptr);
  watchdog.join();

  CHECK(!stuck.load());
  CHECK(how == Acquired::kFromDeadOwner);
  CHECK(alarms.load() > 50);  // the signals did interrupt the wait
  const int64_t died = sh->died_ns.load();
  CHECK(died != 0);
  const double after_ms = static_cast<double>(got_ns - died) / 1e6;
  if (!(after_ms < 50)) std::fprintf(stderr, "  takeover %.1f ms after the death\n", after_ms);
  CHECK(after_ms < 50);
  if (!stuck.load()) futex_lock::unlock(sh->w);
  if (!probe.reaped) wait_child(pid);
  ::munmap(m, 4096);
}

// A lock held for a while by a live owner is handed over cleanly.
TEST(futex_lock_contended_handoff) {
  LockWord w{0};
  AlwaysAlive probe;
  REQUIRE(futex_lock::lock(w, 1, probe) == Acquired::kClean);
  std::atomic<bool> got{false};
  Acquired how = Acquired::kFromDeadOwner;
  std::thread t([&] {
    AlwaysAlive p2;
    how = futex_lock::lock(w, 2, p2);
    got.store(true);
    futex_lock::unlock(w);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  CHECK(!got.load());
  CHECK(w.load() & futex_lock::kContended);  // the sleeper marked the word
  futex_lock::unlock(w);
  t.join();
  CHECK(got.load());
  CHECK(how == Acquired::kClean);
  CHECK_EQ(w.load(), 0u);
}

}  // namespace
}  // namespace pap::test
