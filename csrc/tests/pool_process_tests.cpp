// Several processes on one pool: a handle from a child that has exited,
// processes creating the same pool at once, random traffic side by side.

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/allocator.hpp"
#include "core/handle.hpp"
#include "core/pool.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolProcesses;

TEST(pool_handle_from_dead_child) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p(tok, cfg);
  Pipe out;
  const uint64_t n = 100000, word = 0x0123456789abcdefull;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);  // its own slot; the parent's Pool is not used here
    auto b = c->allocate(n, true, Mode::kSlow);
    CHILD_CHECK(b);
    fill_pattern(b->payload, b->capacity, word);
    CHILD_CHECK(c->add_pending(b->ref, b->generation, Mode::kSlow));
    CHILD_CHECK(write_string(out.w, encode_handle(handle_of(*c, *b, kHandleFlagTransferRequired))));
    return 0;  // _exit without leave(): its slot and its hold stay behind
  });
  out.close_w();
  auto bytes = read_string(out.r);
  CHECK_EQ(wait_child(pid), 0);
  REQUIRE(bytes);
  Handle h = decode(*bytes);
  auto b = attach_handle(*p, h);  // maps the segment the child created
  REQUIRE(b);
  CHECK(b->capacity >= n);
  CHECK(check_pattern(b->payload, b->capacity, word));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  // The dead child still holds the block until a collection notices.
  CHECK_EQ(p->collect(), Allocator::block_size_for(n));
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// Several processes create the same pool at once: they all end up in one.
TEST(pool_attach_race) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  constexpr int kChildren = 4;
  Pipe go;
  std::vector<std::unique_ptr<Pipe>> outs;
  std::vector<pid_t> pids;
  for (int i = 0; i < kChildren; ++i) {
    outs.push_back(std::make_unique<Pipe>());
    Pipe& out = *outs.back();
    pids.push_back(spawn([&, i] {
      char c;
      CHILD_CHECK(read_all(go.r, &c, 1));
      auto pool = Pool::attach(tok, cfg);
      auto b = pool->allocate(64u * (i + 1), true, Mode::kSlow);
      CHILD_CHECK(b);
      fill_pattern(b->payload, b->capacity, splitmix(static_cast<uint64_t>(i)));
      CHILD_CHECK(pool->add_pending(b->ref, b->generation, Mode::kSlow));
      CHILD_CHECK(
          write_string(out.w, encode_handle(handle_of(*pool, *b, kHandleFlagTransferRequired))));
      return 0;
    }));
  }
  for (auto& o : outs) o->close_w();
  const std::string all(kChildren, 'g');
  CHECK(write_all(go.w, all.data(), all.size()));
  std::vector<std::optional<std::string>> handles;
  for (auto& o : outs) handles.push_back(read_string(o->r));
  for (pid_t pid : pids) CHECK_EQ(wait_child(pid), 0);
  for (const std::string& e : shm_entries(tok)) CHECK(e.find(".init") == std::string::npos);
  Attached p(tok, cfg);
  for (int i = 0; i < kChildren; ++i) {
    if (!handles[i]) {
      record_failure(__FILE__, __LINE__, "child " + std::to_string(i) + " sent no handle");
      continue;
    }
    std::optional<Block> b;
    CHECK_NOTHROW(b = attach_handle(*p, decode(*handles[i])));
    if (!b) continue;
    CHECK(check_pattern(b->payload, b->capacity, splitmix(static_cast<uint64_t>(i))));
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }
  p->collect();
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_processes_share_traffic) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(512u << 20, 4u << 20);
  Attached p(tok, cfg);
  Pipe ready, go;
  std::vector<pid_t> pids;
  for (int i = 0; i < 2; ++i)
    pids.push_back(spawn([&, i] {
      auto c = Pool::attach(tok, cfg);
      char x = 1;
      CHILD_CHECK(write_all(ready.w, &x, 1) && read_all(go.r, &x, 1));  // start together
      int bad = pool_traffic(*c, 100 + i, 4000, 256u << 10);
      c->leave();
      return std::min(bad, 100);
    }));
  ready.close_w();
  char x[2];
  CHECK(read_all(ready.r, x, 2));
  CHECK(write_all(go.w, "gg", 2));
  CHECK_EQ(pool_traffic(*p, 99, 4000, 256u << 10), 0);
  for (pid_t pid : pids) CHECK_EQ(wait_child(pid), 0);
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

}  // namespace
}  // namespace pap::test
