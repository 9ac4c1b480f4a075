// What a pool reports about itself: the usage snapshot, and the events of
// its maintenance (dead processes reclaimed, pickles expired).

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "core/allocator.hpp"
#include "core/handle.hpp"
#include "core/pool.hpp"
#include "core/pool_events.hpp"
#include "core/pool_snapshot.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolReport;

// The snapshot counts blocks by power-of-two size class, per holder slot
// (a shared block counts for each) and per pending block with its sender.
TEST(pool_snapshot) {
  const std::string tok = new_token();
  Attached p1(tok, make_config(64u << 20, 8u << 20));
  Attached p2(tok, make_config(64u << 20, 8u << 20));
  const uint64_t n[3] = {1000, 100000, 3000000};
  std::vector<Block> blocks;
  uint64_t total = 0;
  for (uint64_t bytes : n) {
    auto b = p1->allocate(bytes, true, Mode::kSlow);
    REQUIRE(b);
    blocks.push_back(*b);
    total += Allocator::block_size_for(bytes);
  }
  CHECK(p1->add_pending(blocks[1].ref, blocks[1].generation, Mode::kSlow));
  CHECK(p1->add_pending(blocks[1].ref, blocks[1].generation, Mode::kSlow));
  // p2 takes one block through a handle that does not consume a pickle.
  auto shared = attach_handle(*p2, handle_of(*p1, blocks[2], 0));
  REQUIRE(shared);
  PoolSnapshot s = p1->snapshot();
  CHECK_EQ(s.stats.used_bytes, total);
  CHECK_EQ(s.instance, p1->instance_id());
  uint64_t used = 0, free_bytes = 0, used_blocks = 0;
  for (const SizeClassStats& c : s.size_classes) {
    CHECK((c.min_size & (c.min_size - 1)) == 0);
    used += c.used_bytes;
    free_bytes += c.free_bytes;
    used_blocks += c.used_blocks;
  }
  CHECK_EQ(used, total);
  CHECK_EQ(free_bytes, s.stats.free_bytes);
  CHECK_EQ(used_blocks, 3u);
  REQUIRE(s.processes.size() == 2);
  CHECK_EQ(s.processes[0].slot, p1->slot());  // most bytes first
  CHECK_EQ(s.processes[0].blocks, 3u);
  CHECK_EQ(s.processes[0].bytes, total);
  CHECK_EQ(s.processes[1].slot, p2->slot());
  CHECK_EQ(s.processes[1].blocks, 1u);
  CHECK_EQ(s.processes[1].bytes, Allocator::block_size_for(n[2]));
  CHECK_EQ(s.processes[1].pid, static_cast<int>(::getpid()));
  REQUIRE(s.pending.size() == 1);
  CHECK_EQ(s.pending[0].pickles, 2u);
  CHECK_EQ(s.pending[0].block_size, Allocator::block_size_for(n[1]));
  CHECK_EQ(s.pending[0].sender_pid, static_cast<int>(::getpid()));
  CHECK(s.pending[0].age_ns < 30'000'000'000ull);
  CHECK(s.pending[0].expires_in_ns > 0);
  CHECK_EQ(s.pending_bytes, Allocator::block_size_for(n[1]));
  const std::string usage = describe_usage(s);
  CHECK(usage.find("pid " + std::to_string(::getpid()) + ": ") != std::string::npos);
  CHECK(usage.find("(" + std::to_string(total) + " bytes) in 3 blocks") != std::string::npos);
  CHECK(usage.find("2 pickles pending") != std::string::npos);
  // The sender pid is no flag: handles and Blocks see only the flags.
  auto again = attach_handle(*p2, handle_of(*p1, blocks[1], kHandleFlagTransferRequired));
  REQUIRE(again);
  CHECK_EQ(again->flags, kFlagTransferRequired);
  CHECK_EQ(p1->inspect_block(blocks[1].ref).flags, kFlagTransferRequired);
  CHECK(!p1->has_events());
  CHECK_NOTHROW(p1->verify());
}

// Maintenance records one event per dead process it reclaims from and per
// sender whose pickles it drops; leaving is no event.
TEST(pool_events) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20, 200'000'000);  // 200 ms
  Attached p(tok, cfg);
  Pipe out;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    for (uint64_t bytes : {uint64_t{5000}, uint64_t{70000}})
      CHILD_CHECK(c->allocate(bytes, false, Mode::kSlow));
    CHILD_CHECK(write_string(out.w, "ready"));
    return 0;  // _exit without leave(): dead, holding two blocks
  });
  out.close_w();
  CHECK(read_string(out.r));
  CHECK_EQ(wait_child(pid), 0);
  const uint64_t held = Allocator::block_size_for(5000) + Allocator::block_size_for(70000);
  CHECK_EQ(p->collect(), held);
  REQUIRE(p->has_events());
  uint64_t dropped = 1;
  std::vector<PoolEvent> ev = p->take_events(&dropped);
  CHECK_EQ(dropped, 0u);
  CHECK(!p->has_events());
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].kind == PoolEvent::Kind::kReclaim);
  CHECK_EQ(ev[0].pid, static_cast<int>(pid));
  CHECK(!ev[0].reserved);
  CHECK_EQ(ev[0].blocks, 2u);
  CHECK_EQ(ev[0].bytes, held);
  CHECK_EQ(ev[0].freed_bytes, held);
  const std::string msg = describe(ev[0]);
  CHECK(msg.find("dead process pid " + std::to_string(pid)) != std::string::npos);
  CHECK(msg.find(std::to_string(held) + " bytes") != std::string::npos);
  p->collect();
  CHECK(!p->has_events());  // reported once

  // Two pickles of one block and one of another, never loaded; one block is
  // still held, so only the other goes back.
  auto a = p->allocate(1000, true, Mode::kSlow);
  auto b = p->allocate(9000, true, Mode::kSlow);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(p->add_pending(a->ref, a->generation, Mode::kSlow));
  CHECK(p->add_pending(a->ref, a->generation, Mode::kSlow));
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(a->ref, a->generation, Mode::kSlow));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_EQ(p->collect(), Allocator::block_size_for(1000));
  ev = p->take_events(&dropped);
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].kind == PoolEvent::Kind::kExpiry);
  CHECK_EQ(ev[0].pid, static_cast<int>(::getpid()));
  CHECK_EQ(ev[0].blocks, 2u);
  CHECK_EQ(ev[0].pickles, 3u);
  CHECK_EQ(ev[0].bytes, Allocator::block_size_for(1000) + Allocator::block_size_for(9000));
  CHECK_EQ(ev[0].freed_bytes, Allocator::block_size_for(1000));
  CHECK(ev[0].age_ns >= 200'000'000ull && ev[0].age_ns < 30'000'000'000ull);
  CHECK_EQ(ev[0].timeout_ns, 200'000'000ull);
  CHECK(describe(ev[0]).find("3 pickles of 2 blocks") != std::string::npos);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK(!p->has_events());

  // A bounded queue: what does not fit is counted, not lost silently.
  EventLog log;
  for (size_t i = 0; i < EventLog::kMax + 5; ++i) log.push(PoolEvent{});
  CHECK_EQ(log.drain(&dropped).size(), EventLog::kMax);
  CHECK_EQ(dropped, 5u);
  CHECK(log.empty());
}

// Each slot names its program (ProcessSlot::program): a reclaim from a
// process of the reclaimer's own program is routine (logged at DEBUG by the
// binding), from any other one, or from one that died holding the pool lock,
// it is not.
TEST(pool_events_name_the_dead_process_program) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  const ProgramRoot mine{static_cast<int>(::getpid()), process_start_time(::getpid())};
  ProgramRoot other = mine;
  other.start_time += 1;  // the same pid, another process: another program
  CHECK(program_id(mine) != 0);
  CHECK_EQ(program_id(mine), program_id(ProgramRoot{mine}));
  CHECK(program_id(other) != program_id(mine));
  CHECK_EQ(program_id(ProgramRoot{}), 0u);  // no root ("none"): no program
  Attached p(tok, cfg, mine);

  // A child attached as `root` (or forked by `p` if `forked`) that dies
  // holding one block of `bytes`, inside the pool lock if `in_lock`.
  auto reclaim = [&](ProgramRoot root, uint64_t bytes, bool forked, bool in_lock) {
    Pipe out;
    auto child = [&, root, bytes, in_lock](Pool& c) {
      CHILD_CHECK(c.allocate(bytes, false, Mode::kSlow));
      if (in_lock) c.lock_forever();
      CHILD_CHECK(write_string(out.w, "ready"));
      return 0;  // _exit without leave(): dead, holding its block
    };
    pid_t pid;
    if (forked) {
      p->before_fork();
      p->lock_for_fork();
      pid = ::fork();
      if (pid == 0) {
        p->after_fork_child();
        ::_exit(child(*p));
      }
      p->after_fork_parent();
    } else {
      pid = spawn([&] {
        auto c = Pool::attach(tok, cfg, root);
        return child(*c);
      });
    }
    out.close_w();
    CHECK(read_string(out.r));
    CHECK_EQ(wait_child(pid), 0);
    p->collect();
    uint64_t dropped = 1;
    std::vector<PoolEvent> ev = p->take_events(&dropped);
    CHECK_EQ(dropped, 0u);
    REQUIRE(ev.size() == 1);
    CHECK(ev[0].kind == PoolEvent::Kind::kReclaim);
    CHECK_EQ(ev[0].pid, static_cast<int>(pid));
    CHECK_EQ(ev[0].bytes, Allocator::block_size_for(bytes));
    return ev[0];
  };
  PoolEvent e = reclaim(mine, 5000, false, false);
  CHECK(e.same_program && !e.held_lock && routine(e));
  e = reclaim(mine, 6000, true, false);  // a fork child: its parent's program
  CHECK(e.same_program && !e.held_lock && routine(e));
  e = reclaim(other, 7000, false, false);
  CHECK(!e.same_program && !routine(e));
  e = reclaim(ProgramRoot{}, 8000, false, false);
  CHECK(!e.same_program && !routine(e));
  e = reclaim(mine, 9000, false, true);  // the lock is repaired: data may be lost
  CHECK(e.same_program && e.held_lock && !routine(e));
  CHECK(describe(e).find("died holding the pool's lock") != std::string::npos);
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());

  // An expiry is never routine; past the queue's bound, the routine events
  // dropped are counted apart, so that they need not be a warning either.
  PoolEvent expiry;
  expiry.kind = PoolEvent::Kind::kExpiry;
  expiry.same_program = true;
  CHECK(!routine(expiry));
  EventLog log;
  PoolEvent quiet;
  quiet.same_program = true;
  for (size_t i = 0; i < EventLog::kMax + 3; ++i) log.push(quiet);
  log.push(PoolEvent{});
  uint64_t dropped = 0, dropped_routine = 0;
  CHECK_EQ(log.drain(&dropped, &dropped_routine).size(), EventLog::kMax);
  CHECK_EQ(dropped, 4u);
  CHECK_EQ(dropped_routine, 3u);
}

}  // namespace
}  // namespace pap::test
