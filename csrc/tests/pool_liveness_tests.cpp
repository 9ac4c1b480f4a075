// Liveness across fork and exec: a pool process that dies while a fork
// child of it still maps the control segment, and a fork child that execs
// another program.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "core/pool.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolLiveness;

// Polls `cond` every millisecond for up to `seconds`.
template <class F>
bool eventually(F&& cond, int seconds) {
  const auto deadline = Clock::now() + std::chrono::seconds(seconds);
  while (!cond()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// A fork as the binding makes one: the reservation, the pthread_atfork
// prepare handler, fork(), then the parent's or the child's handler.
pid_t fork_with_hooks(Pool& p, const std::function<int()>& child_body) {
  p.before_fork();
  p.lock_for_fork();
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    p.after_fork_child();
    int rc = 99;
    try {
      rc = child_body();
    } catch (...) {
      rc = 98;
    }
    ::_exit(rc);
  }
  p.after_fork_parent();
  return pid;
}

TEST(pool_process_dead_while_its_fork_child_maps_the_pool) {
  // A's fork child C inherits A's mappings, and a mapping keeps alive the
  // open file description it was made from. A's slot must still end with A.
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 4u << 20);
  Attached p(tok, cfg);
  Pipe ready, go;
  pid_t a = fork_child(
      [&]() -> int {
        go.close_w();
        auto pa = Pool::attach(tok, cfg);
        auto b = pa->allocate(1000, false, Mode::kSlow);
        CHILD_CHECK(b);
        fill_pattern(b->payload, b->capacity, 0xA5A5A5A5A5A5A5A5ull);
        pid_t c = fork_with_hooks(*pa, [&]() -> int {
          char x = 0;
          read_all(go.r, &x, 1);  // until EOF: the test is over
          CHILD_CHECK(check_pattern(b->payload, b->capacity, 0xA5A5A5A5A5A5A5A5ull));
          return 0;
        });
        CHILD_CHECK(c > 0);
        CHILD_CHECK(write_all(ready.w, &c, sizeof c));
        ::pause();  // until killed
        return 0;
      },
      ChildOptions{60, true, "A"});
  REQUIRE(a > 0);
  ready.close_w();
  go.close_r();
  pid_t c = -1;
  REQUIRE(read_all(ready.r, &c, sizeof c));
  PoolStats s = p->stats();
  CHECK_EQ(s.processes, 3u);
  ::kill(a, SIGKILL);
  CHECK_EQ(wait_child(a), 128 + SIGKILL);
  CHECK(eventually([&] { return p->stats().processes == 2; }, 10));
  s = p->stats();
  CHECK(std::find(s.pids.begin(), s.pids.end(), a) == s.pids.end());
  CHECK(std::find(s.pids.begin(), s.pids.end(), c) != s.pids.end());
  CHECK_EQ(s.live_blocks, 1u);  // the child's inherited hold
  CHECK_NOTHROW(p->verify());
  go.close_w();
  // C is A's child, reparented: its end shows in the pool.
  CHECK(eventually([&] { return p->stats().processes == 1 && p->stats().live_blocks == 0; }, 10));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_fork_child_that_execs_gives_up_its_slot) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 4u << 20);
  Attached p(tok, cfg);
  auto b = p->allocate(5000, false, Mode::kSlow);
  REQUIRE(b);
  pid_t c = fork_with_hooks(*p, [&]() -> int {
    ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
    return 97;
  });
  REQUIRE(c > 0);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  // Once it has exec'd, it is no pool process and holds nothing, though it runs.
  CHECK(eventually(
      [&] {
        PoolStats s = p->stats();
        return s.processes == 1 && s.live_blocks == 0 && s.used_bytes == 0;
      },
      10));
  CHECK(::kill(c, 0) == 0);
  ::kill(c, SIGKILL);
  CHECK_EQ(wait_child(c), 128 + SIGKILL);
  CHECK_NOTHROW(p->verify());
}

}  // namespace
}  // namespace pap::test
