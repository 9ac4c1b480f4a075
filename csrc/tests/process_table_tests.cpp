// Process table tests: claiming and releasing slots, liveness by pid and
// start time, fork reservations, zombies, a process out of descriptors.

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <set>
#include <thread>

#include "core/process_table.hpp"
#include "harness.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kProcessTable;

TEST(process_table) {
  const pid_t me = ::getpid();
  bool zombie = true;
  const uint64_t st = process_start_time(me, &zombie);
  CHECK(st != 0);
  CHECK(!zombie);
  CHECK_EQ(process_start_time(me), st);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_EQ(process_start_time(me), st);
  CHECK_EQ(process_start_time(4194304 + 1), 0u);  // above any pid_max

  auto t = std::make_unique<ProcessTable>();
  const uint64_t now = monotonic_ns();
  std::set<int> got;
  for (uint32_t i = 0; i < kMaxSlots; ++i) got.insert(t->claim(slot_id(me, SlotKind::kActive), {}));
  CHECK_EQ(got.size(), size_t{kMaxSlots});
  CHECK(!got.count(-1));
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), -1);
  t->release(5);
  t->release(77);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), 5);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), 77);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), -1);
  for (uint32_t i = 0; i < kMaxSlots; ++i) t->release(i);
  for (uint32_t i = 0; i < kMaxSlots; ++i) CHECK_EQ(t->slots[i].id.load(), 0u);
  CHECK(!t->alive(0, now));  // a free slot has no live owner

  const uint64_t id = slot_id(me, SlotKind::kActive);
  CHECK_EQ(slot_pid(id), me);
  CHECK(slot_kind(id) == SlotKind::kActive);
  int s = t->claim(id, {});
  REQUIRE(s == 0);
  CHECK(t->alive(0, now));  // start time not written yet: alive
  t->slots[0].start_time.store(st);
  CHECK(t->alive(0, now));
  t->slots[0].start_time.store(st + 1);  // the pid now names a newer process
  CHECK(!t->alive(0, now));
  t->slots[0].start_time.store(st);

  // A reservation for a fork child lives for the grace period.
  int r = t->claim(slot_id(me, SlotKind::kReserved), {});
  REQUIRE(r == 1);
  t->slots[1].reserved_at_ns.store(now);
  CHECK(t->alive(1, now));
  CHECK(t->alive(1, now + kReservationGraceNs - 1));
  CHECK(!t->alive(1, now + kReservationGraceNs + 1));

  // A child: alive, then a zombie (dead), then reaped (dead).
  Pipe go;
  pid_t pid = spawn([&] {
    char c;
    read_all(go.r, &c, 1);
    return 0;
  });
  go.close_r();
  REQUIRE(t->claim(slot_id(pid, SlotKind::kActive), {}) == 2);
  const uint64_t cst = process_start_time(pid);
  CHECK(cst != 0);
  t->slots[2].start_time.store(cst);
  CHECK(t->alive(2, monotonic_ns()));
  char c = 1;
  write_all(go.w, &c, 1);
  siginfo_t info{};
  CHECK(::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) == 0);
  bool z = false;
  CHECK_EQ(process_start_time(pid, &z), cst);  // a zombie still has its /proc entry
  CHECK(z);
  CHECK(!t->alive(2, monotonic_ns()));
  CHECK_EQ(wait_child(pid), 0);
  CHECK_EQ(process_start_time(pid), 0u);
  CHECK(!t->alive(2, monotonic_ns()));

  // A process out of file descriptors cannot read /proc, which must not
  // make it think that a live owner is dead (and reclaim its blocks).
  pid = spawn([&] {
    struct rlimit rl;
    CHILD_CHECK(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
    rl.rlim_cur = 32;
    CHILD_CHECK(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
    while (::open("/dev/null", O_RDONLY) >= 0) {
    }
    CHILD_CHECK(errno == EMFILE);
    CHILD_CHECK(t->alive(0, monotonic_ns()));  // slot 0: the parent, alive
    return 0;
  });
  CHECK_EQ(wait_child(pid), 0);
}

}  // namespace
}  // namespace pap::test
