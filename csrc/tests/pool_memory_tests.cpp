// Memory that follows the work: pages reserved as blocks first need them,
// idle free pages given back, and a process killed while giving them back.

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/pool.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolMemory;
constexpr uint64_t kMiB = uint64_t{1} << 20;

// What /dev/shm holds for the pool `tok` (allocated pages of its files).
uint64_t shm_bytes(const std::string& tok) {
  uint64_t total = 0;
  for (const std::string& n : shm_entries(tok)) {
    struct stat st;
    if (::stat(("/dev/shm/" + n).c_str(), &st) == 0) total += uint64_t(st.st_blocks) * 512;
  }
  return total;
}

PoolConfig with_decay(uint64_t decay_ns) {
  PoolConfig cfg = make_config(1u << 30, 64 * kMiB);
  cfg.decay_ns = decay_ns;
  return cfg;
}

TEST(pool_reserves_pages_as_blocks_need_them) {
  const std::string tok = new_token();
  Attached p(tok, with_decay(0));
  // A fast allocation that would need pages reserved gives up (a system
  // call), and changes nothing.
  auto b = p->allocate(3 * kMiB, false, Mode::kSlow);
  REQUIRE(b);
  std::memset(b->payload, 1, b->capacity);
  const uint64_t held = shm_bytes(tok);
  CHECK(held >= 3 * kMiB);
  CHECK(held < 4 * kMiB);  // not the 64 MiB segment
  CHECK(!p->allocate(5 * kMiB, false, Mode::kFast));
  PoolStats s = p->stats();
  CHECK_EQ(s.reserved_bytes, held);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  // Decay 0: due at once. The segment holds nothing and goes.
  CHECK(p->return_idle_memory() >= 3 * kMiB);
  CHECK(shm_bytes(tok) < kMiB);
  s = p->stats();
  CHECK(s.returned_bytes >= 3 * kMiB);
  CHECK_EQ(s.capacity_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  // Growing again works, with fresh pages.
  auto c = p->allocate(3 * kMiB, false, Mode::kSlow);
  REQUIRE(c);
  std::memset(c->payload, 2, c->capacity);
  CHECK(p->release(c->ref, c->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_keeps_memory_reused_within_the_decay_time) {
  const std::string tok = new_token();
  Attached p(tok, with_decay(30'000'000'000ull));
  auto keep = p->allocate(1000, false, Mode::kSlow);  // the segment never empties
  REQUIRE(keep);
  for (int i = 0; i < 20; ++i) {
    auto b = p->allocate(8 * kMiB, false, Mode::kSlow);
    REQUIRE(b);
    std::memset(b->payload, i, b->capacity);
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
    CHECK_EQ(p->return_idle_memory(), 0u);
  }
  CHECK_EQ(p->stats().returned_bytes, 0u);
  CHECK(shm_bytes(tok) >= 8 * kMiB);
  CHECK(p->release(keep->ref, keep->generation, Mode::kSlow));
  p->leave();
}

TEST(pool_prefers_free_blocks_whose_pages_are_reserved) {
  // A free block whose pages are reserved serves a request before one that
  // would need fresh pages, even when the allocator's size classes name the
  // other first: here the segment's unreserved tail (about 24 MiB) comes
  // before the freed, reserved 40 MiB block for a 20 MiB request.
  const std::string tok = new_token();
  Attached p(tok, with_decay(30'000'000'000ull));
  auto x = p->allocate(40 * kMiB, false, Mode::kSlow);
  auto y = p->allocate(1000, false, Mode::kSlow);  // keeps x from the tail
  REQUIRE(x && y);
  std::memset(x->payload, 1, x->capacity);
  CHECK(p->release(x->ref, x->generation, Mode::kSlow));
  const uint64_t held = shm_bytes(tok);
  // No page to reserve, so no system call: even kFast takes it.
  auto z = p->allocate(20 * kMiB, false, Mode::kFast);
  REQUIRE(z);
  CHECK_EQ(z->ref.bits(), x->ref.bits());
  CHECK_EQ(shm_bytes(tok), held);
  std::memset(z->payload, 2, z->capacity);
  CHECK(p->release(z->ref, z->generation, Mode::kSlow));
  CHECK(p->release(y->ref, y->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_process_killed_while_returning_memory) {
  const std::string tok = new_token();
  const PoolConfig cfg = with_decay(30'000'000'000ull);
  Attached p(tok, cfg);
  auto keep = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(keep);
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    auto b = c->allocate(16 * kMiB, false, Mode::kSlow);
    CHILD_CHECK(b);
    std::memset(b->payload, 7, b->capacity);
    CHILD_CHECK(c->release(b->ref, b->generation, Mode::kSlow));
    c->die_while_returning();  // SIGKILLed holding the lock, mid-return
  });
  CHECK_EQ(wait_child(pid), 128 + SIGKILL);
  // The survivor takes the lock over and repairs: the block the child was
  // giving back is free, its record safe, and it can be handed out again.
  CHECK_NOTHROW(p->verify());
  auto b = p->allocate(16 * kMiB, false, Mode::kSlow);
  REQUIRE(b);
  std::memset(b->payload, 9, b->capacity);  // every page reserved: no SIGBUS
  CHECK(shm_bytes(tok) >= 16 * kMiB);
  auto other = p->allocate(16 * kMiB, false, Mode::kSlow);  // nothing given twice
  REQUIRE(other);
  CHECK(other->ref != b->ref);
  std::memset(other->payload, 3, other->capacity);
  CHECK_EQ(static_cast<int>(b->payload[b->capacity - 1]), 9);
  CHECK_NOTHROW(p->verify());
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(other->ref, other->generation, Mode::kSlow));
  CHECK(p->release(keep->ref, keep->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

}  // namespace
}  // namespace pap::test
