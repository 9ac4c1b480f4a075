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

}  // namespace
}  // namespace pap::test
