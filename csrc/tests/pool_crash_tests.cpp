// Processes killed at bad moments (inside the lock, inside leave(),
// anywhere in their traffic), and the stale pools dead programs leave: the
// survivors repair and reclaim, and nothing is left behind.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/handle.hpp"
#include "core/pool.hpp"
#include "core/process_table.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolCrash;

TEST(pool_owner_killed_inside_lock) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p(tok, cfg);
  auto mine = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(mine);
  Pipe ready;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    auto b = c->allocate(5000, false, Mode::kSlow);  // held by the child: reclaimed after
    CHILD_CHECK(b);
    c->lock_forever();
    char x = 1;
    write_all(ready.w, &x, 1);
    for (;;) ::pause();
  });
  ready.close_w();
  char x;
  REQUIRE(read_all(ready.r, &x, 1));
  // The owner is alive: kFast gives up at once instead of waiting.
  CHECK(!p->allocate(64, false, Mode::kFast));
  CHECK(!p->release(mine->ref, mine->generation, Mode::kFast));
  ::kill(pid, SIGKILL);
  CHECK_EQ(wait_child(pid), 128 + SIGKILL);
  auto t0 = Clock::now();
  std::optional<Block> b;
  CHECK_NOTHROW(b = p->allocate(1000, false, Mode::kSlow));
  CHECK(b);
  CHECK(seconds_since(t0) < 2.0);
  CHECK_NOTHROW(p->verify());
  PoolStats s = p->stats();
  CHECK_EQ(s.live_blocks, 2u);  // ours; the child's went with it
  CHECK_EQ(s.processes, 1u);
  CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
  if (b) CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// A process killed inside leave() (a Pool.terminate() SIGTERM reaching a
// worker that is already exiting) leaves the pool marked dead. The next
// attacher settles it: it finishes the removal when nobody needs the pool,
// and otherwise marks it running again.
TEST(pool_last_leaver_killed_while_leaving) {
  using Step = Pool::LeaveStep;
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  for (Step at : {Step::kMarkedDead, Step::kUnlocked, Step::kDataUnlinked}) {
    // Alone on the pool: its leave() was removing it.
    const std::string tok = new_token();
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      CHILD_CHECK(c->allocate(100000, false, Mode::kSlow));  // a data segment exists
      c->die_while_leaving(at);
    });
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    CHECK(shm_exists(control_name(tok)));  // what the killed leaver left
    if (at == Step::kDataUnlinked) CHECK_EQ(shm_entries(tok).size(), size_t{1});
    auto t0 = Clock::now();
    std::unique_ptr<Pool> p;
    CHECK_NOTHROW(p = Pool::attach_existing(tok));
    CHECK(p == nullptr);
    CHECK(shm_entries(tok).empty());
    CHECK(seconds_since(t0) < 3.0);
    {
      Attached fresh(tok, cfg);  // the name is free for a new pool
      auto b = fresh->allocate(1000, false, Mode::kSlow);
      CHECK(b);
      if (b) CHECK(fresh->release(b->ref, b->generation, Mode::kSlow));
    }
    CHECK(shm_entries(tok).empty());
    if (g_failures) return;
  }

  // Killed inside the lock, before it found a survivor: the pool runs on.
  {
    const std::string tok = new_token();
    Attached p(tok, cfg);
    auto mine = p->allocate(3000, false, Mode::kSlow);
    REQUIRE(mine);
    fill_pattern(mine->payload, mine->capacity, 11);
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      CHILD_CHECK(c->allocate(5000, false, Mode::kSlow));
      c->die_while_leaving(Step::kMarkedDead);
    });
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    {
      Attached newcomer(tok, cfg);  // finds the pool marked dead; revives it
      PoolStats s = newcomer->stats();
      CHECK_EQ(s.processes, 2u);
      CHECK_EQ(s.live_blocks, 1u);  // ours; the child's went with it
      CHECK_NOTHROW(newcomer->verify());
    }
    CHECK(check_pattern(mine->payload, mine->capacity, 11));
    CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
    p->leave();
    CHECK(shm_entries(tok).empty());
  }

  // Killed inside the lock with pickles in flight to the program's root:
  // the root attaches later and loads them.
  {
    const std::string tok = new_token();
    Pipe out;
    const ProgramRoot me{static_cast<int>(::getpid()), process_start_time(::getpid())};
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg, me);
      auto b = c->allocate(5000, true, Mode::kSlow);
      CHILD_CHECK(b);
      fill_pattern(b->payload, b->capacity, 12);
      CHILD_CHECK(c->add_pending(b->ref, b->generation, Mode::kSlow));
      CHILD_CHECK(
          write_string(out.w, encode_handle(handle_of(*c, *b, kHandleFlagTransferRequired))));
      CHILD_CHECK(c->release(b->ref, b->generation, Mode::kSlow));
      c->die_while_leaving(Step::kMarkedDead);
    });
    out.close_w();
    auto bytes = read_string(out.r);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    REQUIRE(bytes);
    std::unique_ptr<Pool> p;
    CHECK_NOTHROW(p = Pool::attach_existing(tok));
    REQUIRE(p);
    auto b = attach_handle(*p, decode(*bytes));
    REQUIRE(b);
    CHECK(check_pattern(b->payload, b->capacity, 12));
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
    CHECK_EQ(p->stats().used_bytes, 0u);
    p->leave();
    CHECK(shm_entries(tok).empty());
  }
}

// Processes killed at random points of their pool traffic: whatever they
// were doing, the survivor repairs the pool and gets all of it back.
TEST(pool_processes_killed_anywhere) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(512u << 20, 2u << 20);
  Attached p(tok, cfg);
  auto mine = p->allocate(3000, false, Mode::kSlow);
  REQUIRE(mine);
  fill_pattern(mine->payload, mine->capacity, 5);
  std::mt19937_64 rng(8);
  for (int iter = 0; iter < 40; ++iter) {
    const uint64_t seed = rng();
    // Small blocks half of the time: then the child spends much of its time
    // inside the lock, and is often killed there.
    const uint64_t max_bytes = iter % 2 ? 512u << 10 : 2u << 10;
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      pool_traffic(*c, seed, LONG_MAX, max_bytes);
      return 0;
    });
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 15000));
    ::kill(pid, SIGKILL);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    // First thing after the kill: whatever the child left half done inside
    // the lock must be repaired by the next one to take it.
    CHECK_NOTHROW(p->verify());
    std::optional<Block> b;
    CHECK_NOTHROW(b = p->allocate(100, false, Mode::kSlow));  // may take over the lock
    if (b) CHECK(p->release(b->ref, b->generation, Mode::kSlow));
    CHECK_NOTHROW(p->collect());
    CHECK_NOTHROW(p->verify());
    PoolStats s = p->stats();
    CHECK_EQ(s.live_blocks, 1u);
    CHECK_EQ(s.processes, 1u);
    CHECK(check_pattern(mine->payload, mine->capacity, 5));
    if (g_failures) break;
  }
  CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_clean_stale) {
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  // A pool with a live process is never stale. (Attached first: creating a
  // pool sweeps stale ones, which would take the dead one made below.)
  const std::string live = new_token();
  Attached q(live, cfg);
  CHECK(q->allocate(10, false, Mode::kSlow));
  const std::string tok = new_token();
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    auto b = c->allocate(1000, false, Mode::kSlow);
    CHILD_CHECK(b);
    return 0;  // dies attached
  });
  CHECK_EQ(wait_child(pid), 0);
  const std::vector<std::string> left = shm_entries(tok);
  CHECK_EQ(left.size(), size_t{2});  // control and segment 0
  auto contains_all = [&](const std::vector<std::string>& names) {
    for (const std::string& n : left)
      if (std::find(names.begin(), names.end(), n) == names.end()) return false;
    return true;
  };
  auto mentions_live = [&](const std::vector<std::string>& names) {
    for (const std::string& n : names)
      if (n.find(live) != std::string::npos) return true;
    return false;
  };
  auto dry = Pool::clean_stale(true, "");
  CHECK(contains_all(dry));
  CHECK(!mentions_live(dry));
  CHECK_EQ(shm_entries(tok).size(), size_t{2});  // a dry run removes nothing
  auto kept = Pool::clean_stale(true, tok);
  for (const std::string& n : left) CHECK(std::find(kept.begin(), kept.end(), n) == kept.end());
  auto removed = Pool::clean_stale(false, "");
  CHECK(contains_all(removed));
  CHECK(!mentions_live(removed));
  CHECK(shm_entries(tok).empty());
  CHECK_EQ(shm_entries(live).size(), size_t{2});
  CHECK_NOTHROW(q->verify());
}

}  // namespace
}  // namespace pap::test
