// Futex lock tests: mutual exclusion between threads and between
// processes, the takeover of a dead owner's lock, a contended handoff.

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
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
