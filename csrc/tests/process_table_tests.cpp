// Process table and liveness tests: a slot's owner is alive exactly while
// the kernel holds its byte lock on the control file (liveness.hpp) —
// through a crash, an exec, a fork, and a process out of descriptors.

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

#include "core/liveness.hpp"
#include "core/process_table.hpp"
#include "harness.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kProcessTable;

// A file that two open file descriptions can share, like a control segment.
UniqueFd open_lock_file(const char* path) {
  int fd = ::open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  return UniqueFd(fd);
}

TEST(process_start_time_reads_proc) {
  // Still used for the program's root, which may never attach.
  const pid_t me = ::getpid();
  bool zombie = true;
  const uint64_t st = process_start_time(me, &zombie);
  CHECK(st != 0);
  CHECK(!zombie);
  CHECK_EQ(process_start_time(me), st);
  CHECK_EQ(process_start_time(4194304 + 1), 0u);  // above any pid_max
}

TEST(process_table_take_and_release) {
  auto t = std::make_unique<ProcessTable>();
  const uint64_t id = slot_id(::getpid(), SlotKind::kActive);
  CHECK_EQ(slot_pid(id), ::getpid());
  CHECK(slot_kind(id) == SlotKind::kActive);
  CHECK(t->take(7, 0, id, 0xabcdef));
  CHECK_EQ(t->slots[7].id.load(), id);
  CHECK_EQ(t->slots[7].holds_ref.load(), BlockRef::kNilBits);
  CHECK_EQ(t->slots[7].program.load(), 0xabcdefu);  // the owner's program
  CHECK(!t->take(7, 0, id));                        // not free any more
  t->slots[7].holds_ref.store(123);
  CHECK(!t->release_if(7, id + 4));  // another owner's id: untouched
  CHECK_EQ(t->slots[7].program.load(), 0xabcdefu);
  CHECK(t->release_if(7, id));
  CHECK_EQ(t->slots[7].id.load(), 0u);
  CHECK_EQ(t->slots[7].holds_ref.load(), BlockRef::kNilBits);
  CHECK_EQ(t->slots[7].program.load(), 0u);  // a free slot names no program
  CHECK(t->take(kMaxSlots - 1, 0, id));      // every one of the 4096 slots is usable
}

TEST(liveness_follows_the_kernel_lock) {
  char path[] = "/tmp/pap-liveness-XXXXXX";
  int tmp = ::mkstemp(path);
  REQUIRE(tmp >= 0);
  ::close(tmp);
  UniqueFd a = open_lock_file(path);
  UniqueFd b = open_lock_file(path);
  ::unlink(path);
  REQUIRE(a && b);
  CHECK(!liveness::held_by_other(b.get(), 5));
  CHECK(liveness::lock_slot(a.get(), 5));
  CHECK(liveness::held_by_other(b.get(), 5));
  CHECK(!liveness::held_by_other(a.get(), 5));  // one's own lock is no conflict
  CHECK(!liveness::lock_slot(b.get(), 5));      // taken
  CHECK(liveness::lock_slot(b.get(), kMaxSlots - 1));
  CHECK(liveness::any_held_by_other(a.get(), 0, kMaxSlots));
  liveness::unlock_slot(a.get(), 5);
  CHECK(!liveness::held_by_other(b.get(), 5));

  // A process killed while holding its byte: free at once.
  Pipe ready;
  pid_t pid = spawn([&] {
    CHILD_CHECK(liveness::lock_slot(a.get(), 9));  // a's description, inherited: shared
    char c = 1;
    write_all(ready.w, &c, 1);
    for (;;) ::pause();
    return 0;
  });
  char c;
  REQUIRE(read_all(ready.r, &c, 1));
  CHECK(liveness::held_by_other(b.get(), 9));
  ::kill(pid, SIGKILL);
  CHECK_EQ(wait_child(pid), 128 + SIGKILL);
  // The description is shared with us (fork): the lock lives while we keep
  // it open. That is why a fork child closes its parent's description.
  CHECK(liveness::held_by_other(b.get(), 9));
  liveness::unlock_slot(a.get(), 9);
  CHECK(!liveness::held_by_other(b.get(), 9));
}

TEST(liveness_of_a_child_that_dies_or_execs) {
  char path[] = "/tmp/pap-liveness-XXXXXX";
  int tmp = ::mkstemp(path);
  REQUIRE(tmp >= 0);
  ::close(tmp);
  UniqueFd probe = open_lock_file(path);
  REQUIRE(probe);
  for (bool exec_it : {false, true}) {
    Pipe ready, go;
    pid_t pid = spawn([&] {
      // Its own description, O_CLOEXEC, as a pool process has.
      UniqueFd mine = open_lock_file(path);
      CHILD_CHECK(mine && liveness::lock_slot(mine.get(), 3));
      char c = 1;
      write_all(ready.w, &c, 1);
      read_all(go.r, &c, 1);
      if (exec_it) {
        // The new program knows nothing of the pool: its slot must end.
        ::execl("/bin/sleep", "sleep", "5", static_cast<char*>(nullptr));
        return 97;
      }
      return 0;
    });
    char c;
    REQUIRE(read_all(ready.r, &c, 1));
    CHECK(liveness::held_by_other(probe.get(), 3));
    c = 1;
    write_all(go.w, &c, 1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (liveness::held_by_other(probe.get(), 3) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    CHECK(!liveness::held_by_other(probe.get(), 3));
    if (exec_it) {
      CHECK(::kill(pid, 0) == 0);  // still running (sleep), yet no longer a pool process
      ::kill(pid, SIGKILL);
    }
    wait_child(pid);
  }
  ::unlink(path);
}

TEST(liveness_without_free_descriptors) {
  // A process out of file descriptors must not think a live owner dead
  // (and reclaim its blocks): the question needs no new descriptor.
  char path[] = "/tmp/pap-liveness-XXXXXX";
  int tmp = ::mkstemp(path);
  REQUIRE(tmp >= 0);
  ::close(tmp);
  UniqueFd owner = open_lock_file(path);
  UniqueFd probe = open_lock_file(path);
  ::unlink(path);
  REQUIRE(owner && probe && liveness::lock_slot(owner.get(), 0));
  pid_t pid = spawn([&] {
    owner.reset();  // the child's copy only; the parent still holds the lock
    struct rlimit rl;
    CHILD_CHECK(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
    rl.rlim_cur = 32;
    CHILD_CHECK(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
    while (::open("/dev/null", O_RDONLY) >= 0) {
    }
    CHILD_CHECK(errno == EMFILE);
    CHILD_CHECK(liveness::held_by_other(probe.get(), 0));
    return 0;
  });
  CHECK_EQ(wait_child(pid), 0);
}

}  // namespace
}  // namespace pap::test
