// Pool tests in one process: attach, allocate, release and leave; pending
// transfers and their expiry; bad handles; a full pool; growth across
// segments; several attachments; the instance id.

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "core/errors.hpp"
#include "core/handle.hpp"
#include "core/pool.hpp"
#include "core/process_table.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPool;

// 8. Pool.
TEST(pool_attach_allocate_release_leave) {
  const std::string tok = new_token();
  CHECK(Pool::attach_existing(tok) == nullptr);
  CHECK_THROWS(ErrorKind::kPool, Pool::attach("not-a-token", make_config(1 << 20, 1 << 20)));
  CHECK_THROWS(ErrorKind::kPool, Pool::attach(new_token(), make_config(0, 1 << 20)));
  const PoolConfig cfg = make_config(64u << 20, 4u << 20, 123456789);
  Attached p(tok, cfg);
  CHECK(shm_exists(control_name(tok)));
  CHECK(p->config() == cfg);
  CHECK_EQ(p->token(), tok);
  PoolStats s = p->stats();
  CHECK_EQ(s.segments, 0u);
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK(s.pids.size() == 1 && s.pids[0] == ::getpid());
  // The first block needs a new segment, a system call: kFast declines.
  CHECK(!p->allocate(100, false, Mode::kFast));
  CHECK_EQ(p->stats().segments, 0u);

  std::vector<Block> blocks;
  uint64_t expect_used = 0;
  for (uint64_t n : {uint64_t{1000}, uint64_t{0}, uint64_t{1}, uint64_t{63}, uint64_t{64},
                     uint64_t{65}, uint64_t{4095}, uint64_t{1} << 20, uint64_t{3} << 20}) {
    auto b = p->allocate(n, false, Mode::kSlow);
    REQUIRE(b);
    CHECK(reinterpret_cast<uintptr_t>(b->payload) % 64 == 0);
    CHECK(b->capacity >= n);
    CHECK(b->generation != 0);
    CHECK_EQ(b->flags, 0u);
    fill_pattern(b->payload, b->capacity, splitmix(b->generation));
    blocks.push_back(*b);
    expect_used += Allocator::block_size_for(n);
  }
  CHECK(shm_entries(tok).size() >= 2);  // the control segment and a data segment
  s = p->stats();
  CHECK_EQ(s.used_bytes, expect_used);
  CHECK_EQ(s.live_blocks, uint64_t{blocks.size()});
  CHECK(s.segments >= 1);
  CHECK_EQ(s.free_bytes, s.capacity_bytes - s.used_bytes);
  CHECK(s.largest_free_block <= s.free_bytes);
  // With a segment mapped and the lock free, kFast works.
  auto f = p->allocate(10, false, Mode::kFast);
  CHECK(f);
  if (f) CHECK(p->release(f->ref, f->generation, Mode::kFast));
  CHECK_NOTHROW(p->verify());
  for (const Block& b : blocks) {
    CHECK(check_pattern(b.payload, b.capacity, splitmix(b.generation)));
    CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  }
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.free_bytes, s.capacity_bytes);
  CHECK_NOTHROW(p->verify());
  const uint32_t segs = s.segments;
  p->leave();
  CHECK(p->left());
  CHECK(shm_entries(tok).empty());
  CHECK(!shm_exists(control_name(tok)));
  CHECK(segs >= 1);
  CHECK_NOTHROW(p->leave());  // a second leave is a no-op
}

TEST(pool_pending_transfers) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(5000, true, Mode::kSlow);
  REQUIRE(b);
  CHECK_EQ(b->flags, kFlagTransferRequired);
  fill_pattern(b->payload, b->capacity, 42);
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->add_pending(b->ref, b->generation, Mode::kFast));
  PoolStats s = p->stats();
  CHECK_EQ(s.pending_transfers, 2u);
  CHECK_EQ(s.pending_blocks, 1u);
  // Released by its only holder, the block lives on for the two pickles.
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.live_blocks, 1u);
  CHECK_EQ(s.used_bytes, Allocator::block_size_for(5000));
  CHECK_NOTHROW(p->verify());
  const Handle h = handle_of(*p, *b, kHandleFlagTransferRequired);
  auto a1 = attach_handle(*p, h);
  REQUIRE(a1);
  CHECK(a1->payload == b->payload && a1->capacity == b->capacity);
  CHECK(check_pattern(a1->payload, a1->capacity, 42));
  CHECK_EQ(p->stats().pending_transfers, 1u);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().live_blocks, 1u);  // one pickle still in flight
  auto a2 = attach_handle(*p, h);
  REQUIRE(a2);
  s = p->stats();
  CHECK_EQ(s.pending_transfers, 0u);
  CHECK_EQ(s.pending_blocks, 0u);
  // A third load of an exhausted handle still works while the block is held,
  // and does not drive the count below zero.
  auto a3 = attach_handle(*p, h);
  CHECK(a3);
  CHECK_EQ(p->stats().pending_transfers, 0u);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_NOTHROW(p->verify());

  // Without transfer tracking: add_pending is a no-op, release frees.
  auto c = p->allocate(300, false, Mode::kSlow);
  REQUIRE(c);
  CHECK(p->add_pending(c->ref, c->generation, Mode::kSlow));
  CHECK_EQ(p->stats().pending_transfers, 0u);
  CHECK(p->release(c->ref, c->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, handle_of(*p, *c, 0)));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->release(c->ref, c->generation, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->add_pending(c->ref, c->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
}

// Auto mode's private copies: one pickle, one load; a second load of the
// same pickle is refused even while the first receiver still holds the block
// (it would share what the first receiver owns alone).
TEST(pool_private_handle_loads_once) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(4096, kFlagTransferRequired | kFlagPrivate, Mode::kSlow);
  REQUIRE(b);
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));  // the sender lets go
  // Neither a non-private handle to it nor a private one to another block
  // loads: the block says what it is.
  CHECK_THROWS(ErrorKind::kInvalidHandle,
               attach_handle(*p, handle_of(*p, *b, kHandleFlagTransferRequired)));
  auto shared = p->allocate(4096, true, Mode::kSlow);
  REQUIRE(shared);
  CHECK(p->add_pending(shared->ref, shared->generation, Mode::kSlow));
  CHECK_THROWS(
      ErrorKind::kInvalidHandle,
      attach_handle(*p, handle_of(*p, *shared, kHandleFlagTransferRequired | kHandleFlagPrivate)));
  CHECK_EQ(p->stats().pending_transfers, 2u);  // refused loads use up nothing
  CHECK(attach_handle(*p, handle_of(*p, *shared, kHandleFlagTransferRequired)));
  // One hold per process, however often it loads: one release frees it.
  CHECK(p->release(shared->ref, shared->generation, Mode::kSlow));
  CHECK_EQ(p->stats().live_blocks, 1u);
  const Handle h = handle_of(*p, *b, kHandleFlagTransferRequired | kHandleFlagPrivate);
  auto a = attach_handle(*p, h);
  REQUIRE(a);
  CHECK_EQ(p->stats().pending_transfers, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_EQ(p->stats().live_blocks, 1u);  // the refused load took no hold
  CHECK(p->release(a->ref, a->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_pending_expires) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20, 200'000'000));  // 200 ms
  auto b = p->allocate(1000, true, Mode::kSlow);
  REQUIRE(b);
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->collect(), 0u);  // not expired yet
  CHECK_EQ(p->stats().live_blocks, 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_EQ(p->collect(), Allocator::block_size_for(1000));
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.pending_transfers, 0u);
  CHECK_EQ(s.pending_blocks, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle,
               attach_handle(*p, handle_of(*p, *b, kHandleFlagTransferRequired)));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_refuses_bad_handles) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(b);
  const uint64_t seg_size = p->stats().capacity_bytes;
  const Handle good = handle_of(*p, *b, 0);

  Handle h = good;
  h.generation += 1;
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->release(b->ref, b->generation + 1, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->add_pending(b->ref, b->generation + 1, Mode::kSlow));
  h = good;
  h.ref = BlockRef(0, seg_size);
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  h.ref = BlockRef(0, seg_size + 64 * 1000);
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->release(h.ref, h.generation, Mode::kSlow));
  h.ref = BlockRef(7, 0);  // a segment this pool does not have
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  h = good;
  h.pool = PoolId::from_token(random_token());
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  h = good;
  h.instance.bytes[15] ^= 1;  // the same token, another instance of the pool
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  // Bytes beyond the block, or a reversed range.
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->attach_block(good, 0, b->capacity + 1, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->attach_block(good, 10, 5, Mode::kSlow));
  h = good;
  h.shape[0] = static_cast<int64_t>(b->capacity) + 1;
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  h.shape[0] = 10;
  h.view_offset = b->capacity - 9;
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  // A stale handle that points into the middle of a live block's payload,
  // where the user's bytes look like a used header: refused by the check.
  std::memset(b->payload, 0, b->capacity);
  auto* fake = reinterpret_cast<BlockHeader*>(b->payload + 64);
  fake->size_flags.store(128 | kUsedBit);
  fake->generation = 99;
  h = good;
  h.ref = BlockRef(b->ref.seg(), b->ref.off() + 128);
  h.generation = 99;
  h.shape[0] = 1;
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  // The real handle still works; the state is intact.
  CHECK(attach_handle(*p, good));
  CHECK(p->attach_block(good, 0, b->capacity, Mode::kSlow));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
}

// A token outlives its pool: the pool made again under it hands out the
// same block with the same generation, and only the instance in the handle
// keeps the old handle from loading the new pool's bytes.
TEST(pool_refuses_a_handle_of_an_ended_pool_with_its_token) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Handle old;
  {
    Attached p(tok, cfg);
    auto b = p->allocate(1000, false, Mode::kSlow);
    REQUIRE(b);
    old = handle_of(*p, *b, 0);
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }  // the only process leaves: the pool ends
  CHECK(shm_entries(tok).empty());
  Attached p(tok, cfg);
  auto b = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(b);
  CHECK(b->ref == old.ref && b->generation == old.generation);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, old));
  CHECK(attach_handle(*p, handle_of(*p, *b, 0)));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
}

TEST(pool_full_and_recovery) {
  const std::string tok = new_token();
  Attached p(tok, make_config(4u << 20, 2u << 20));
  std::vector<Block> blocks;
  ErrorKind kind = ErrorKind::kOs;
  bool threw = false;
  for (int i = 0; i < 100; ++i) {
    try {
      auto b = p->allocate(512u << 10, false, Mode::kSlow);
      REQUIRE(b);
      blocks.push_back(*b);
    } catch (const CoreError& e) {
      threw = true;
      kind = e.kind();
      break;
    }
  }
  CHECK(threw);
  CHECK(kind == ErrorKind::kPoolFull);
  CHECK_EQ(blocks.size(), size_t{6});  // three per 2 MiB segment, two segments
  PoolStats s = p->stats();
  CHECK(s.capacity_bytes <= (4u << 20));
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(8u << 20, false, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(uint64_t{1} << 60, false, Mode::kSlow));
  CHECK(!p->allocate(512u << 10, false, Mode::kFast));  // kFast: "not done", no throw
  CHECK_NOTHROW(p->verify());
  // Freeing one block (the first of its segment, so that it does not merge
  // with the free tail) makes room for the same request again.
  REQUIRE(!blocks.empty());
  CHECK(p->release(blocks[0].ref, blocks[0].generation, Mode::kSlow));
  std::optional<Block> again;
  CHECK_NOTHROW(again = p->allocate(512u << 10, false, Mode::kSlow));
  CHECK(again && again->ref == blocks[0].ref);
  if (again)
    blocks[0] = *again;
  else
    blocks.erase(blocks.begin());
  for (const Block& b : blocks) CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  // The emptied segments are given back, so a request larger than a
  // segment fits within max_bytes; one beyond max_bytes still does not.
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(5u << 20, false, Mode::kSlow));
  std::optional<Block> big;
  CHECK_NOTHROW(big = p->allocate(3u << 20, false, Mode::kSlow));
  REQUIRE(big);
  s = p->stats();
  CHECK(s.capacity_bytes <= (4u << 20));
  CHECK_NOTHROW(p->verify());
  CHECK(p->release(big->ref, big->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
}

// Under max_bytes, segments are made and given back all the time: arrays
// of 300, 600 and 900 KB in a pool of 1 MiB, and a 1.5 MB request that
// cannot fit (it gives back every empty segment, then fails). Over 4,096
// segments are made, more than there are segment numbers: numbers of
// given-back segments are used again, and every request that fits
// max_bytes succeeds. `q`, a second attachment with mappings of its own,
// loads a handle now and then and does nothing in between, so it still has
// segments mapped that were given back (and whose numbers were reused): it
// must see the live block's bytes, and a handle of a given-back block must
// be stale for it as for `p`.
TEST(pool_reuses_segment_numbers_under_max_bytes) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(1u << 20, 64u << 20);
  Attached p(tok, cfg);
  Attached q(tok, cfg);
  auto first = p->allocate(300000, false, Mode::kSlow);
  REQUIRE(first);
  const Handle stale = handle_of(*p, *first, 0);
  {
    auto seen_by_q = attach_handle(*q, stale);  // q maps segment 0
    REQUIRE(seen_by_q);
    CHECK(q->release(seen_by_q->ref, seen_by_q->generation, Mode::kSlow));
  }
  CHECK(p->release(first->ref, first->generation, Mode::kSlow));
  const uint64_t sizes[] = {300000, 600000, 900000, 1500000};
  std::set<std::string> files;
  int made = 0, full = 0;
  for (int i = 0; i < 6000 && !g_failures; ++i) {
    const uint64_t size = sizes[i % 4];
    std::optional<Block> b;
    try {
      b = p->allocate(size, false, Mode::kSlow);
    } catch (const CoreError& e) {
      CHECK(e.kind() == ErrorKind::kPoolFull);
      CHECK(size > cfg.max_bytes);  // only the request that cannot fit fails
      ++full;
      continue;
    }
    REQUIRE(b);
    ++made;
    fill_pattern(b->payload, b->capacity, splitmix(b->generation));
    for (const std::string& n : shm_entries(tok)) files.insert(n);
    if (i % 37 == 0) {
      std::optional<Block> got;
      CHECK_NOTHROW(got = attach_handle(*q, handle_of(*p, *b, 0)));
      if (got) {
        CHECK(check_pattern(got->payload, got->capacity, splitmix(b->generation)));
        CHECK(q->release(got->ref, got->generation, Mode::kSlow));
      }
    }
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }
  CHECK_EQ(made, 4500);
  CHECK_EQ(full, 1500);
  CHECK(files.size() > 4096 + 1);  // the control segment is one of them
  CHECK(p->stats().segments <= 8);
  // The same place in a segment with the same number, made again: the old
  // handle is stale for both, the new block's handle works for both.
  auto again = p->allocate(300000, false, Mode::kSlow);
  REQUIRE(again);
  fill_pattern(again->payload, again->capacity, 77);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*q, stale));
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, stale));
  auto fresh = attach_handle(*q, handle_of(*p, *again, 0));
  REQUIRE(fresh);
  CHECK(check_pattern(fresh->payload, fresh->capacity, 77));
  CHECK(q->release(fresh->ref, fresh->generation, Mode::kSlow));
  CHECK(p->release(again->ref, again->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
  CHECK_NOTHROW(q->verify());
  CHECK_EQ(p->stats().used_bytes, 0u);
}

TEST(pool_grows_across_segments) {
  const std::string tok = new_token();
  Attached p(tok, make_config(256u << 20, 2u << 20));
  std::vector<Block> blocks;
  for (int i = 0; i < 12; ++i) {
    auto b = p->allocate(1u << 20, false, Mode::kSlow);
    REQUIRE(b);
    fill_pattern(b->payload, b->capacity, splitmix(b->generation));
    blocks.push_back(*b);
  }
  PoolStats s = p->stats();
  CHECK(s.segments >= 6);
  std::set<uint32_t> segs_used;
  for (const Block& b : blocks) segs_used.insert(b.ref.seg());
  CHECK(segs_used.size() >= 6);
  CHECK_EQ(shm_entries(tok).size(), size_t{s.segments} + 1);
  CHECK_NOTHROW(p->verify());
  for (const Block& b : blocks) {
    CHECK(check_pattern(b.payload, b.capacity, splitmix(b.generation)));
    CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  }
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// A request of over 128 MiB in a pool of small segments gets a segment of
// its own, which must then be able to hold it.
TEST(pool_large_block_own_segment) {
  const std::string tok = new_token();
  Attached p(tok, make_config(1u << 30, 2u << 20));
  const uint64_t n = (128u << 20) + 1;
  std::optional<Block> b;
  CHECK_NOTHROW(b = p->allocate(n, false, Mode::kSlow));
  if (b) {
    CHECK(b->capacity >= n);
    b->payload[0] = 1;
    b->payload[n - 1] = 2;
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK(s.capacity_bytes <= (132u << 20));  // one segment, not a failed one plus a retry
  CHECK_NOTHROW(p->verify());
}

TEST(pool_leave_not_last) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p1(tok, cfg);
  Attached p2(tok, cfg);  // a second attachment from the same process
  CHECK(p1->slot() != p2->slot());
  CHECK_EQ(p2->stats().processes, 2u);
  auto b = p1->allocate(2000, true, Mode::kSlow);
  REQUIRE(b);
  fill_pattern(b->payload, b->capacity, 7);
  auto c = p1->allocate(2000, false, Mode::kSlow);
  REQUIRE(c);
  CHECK(p1->add_pending(b->ref, b->generation, Mode::kSlow));
  const Handle h = handle_of(*p1, *b, kHandleFlagTransferRequired);
  p1->leave();
  CHECK(shm_exists(control_name(tok)));  // p2 is still attached
  PoolStats s = p2->stats();
  CHECK_EQ(s.processes, 1u);
  CHECK_EQ(s.live_blocks, 1u);  // c went with p1; b waits for its pickle
  auto got = attach_handle(*p2, h);
  REQUIRE(got);
  CHECK(check_pattern(got->payload, got->capacity, 7));
  CHECK(p2->release(got->ref, got->generation, Mode::kSlow));
  CHECK_EQ(p2->stats().used_bytes, 0u);
  CHECK_NOTHROW(p2->verify());
  p2->leave();
  CHECK(shm_entries(tok).empty());
}

// The instance id is drawn once per pool creation: every attachment sees the
// creator's, and a pool recreated under the same token gets a new one.
TEST(pool_instance_id) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(8u << 20, 2u << 20);
  std::string first;
  {
    Attached p1(tok, cfg);
    Attached p2(tok, cfg);
    first = p1->instance_id();
    CHECK_EQ(first.size(), size_t{32});
    CHECK(valid_token(first));  // 32 lowercase hex digits, like a token
    CHECK_EQ(p2->instance_id(), first);
    CHECK(first != std::string(32, '0'));
  }
  CHECK(shm_entries(tok).empty());
  Attached again(tok, cfg);
  CHECK(again->instance_id() != first);
  Attached other(new_token(), cfg);
  CHECK(other->instance_id() != again->instance_id());
  const std::string boot = boot_id();
  CHECK_EQ(boot.size(), size_t{36});  // a UUID, without its newline
  CHECK_EQ(boot_id(), boot);
}

}  // namespace
}  // namespace pap::test
