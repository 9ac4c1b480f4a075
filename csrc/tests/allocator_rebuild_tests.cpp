// Allocator rebuild tests: the free index is only an index, rebuilt from the
// chain of blocks alone; after it was lost, after a process was killed in
// the middle of an operation, and with a keep function that drops blocks.

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iterator>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "allocator_arena.hpp"
#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "harness.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kAllocatorRebuild;

// Every (ref, size) on the free lists.
std::set<std::pair<uint64_t, uint64_t>> free_lists_of(Arena& ar) {
  std::set<std::pair<uint64_t, uint64_t>> out;
  Allocator a = ar.alloc();
  for (uint32_t fl = 0; fl < kFlCount; ++fl)
    for (uint32_t sl = 0; sl < kSlCount; ++sl)
      for (uint64_t b = ar.state().heads[fl][sl]; b != BlockRef::kNilBits;) {
        BlockHeader* h = a.header(BlockRef::from_bits(b));
        out.insert({b, h->size()});
        b = h->free_links.next;
        if (out.size() > 10'000'000) return out;  // a cycle: verify reports it
      }
  return out;
}

// What rebuild() should report for a chain: its free blocks' totals.
Allocator::WalkTotals free_totals_of(const std::vector<ChainBlock>& chain) {
  Allocator::WalkTotals t;
  for (const ChainBlock& b : chain)
    if (!b.used) {
      t.free_bytes += b.size;
      ++t.free_blocks;
      t.largest_free = std::max(t.largest_free, b.size);
    }
  return t;
}

// Runs `n` random operations on `ar`, updating `live` (ref bits -> size).
void random_ops(Arena& ar, std::mt19937_64& rng, int n, uint64_t max_bytes,
                std::map<uint64_t, uint64_t>& live, uint64_t& generation) {
  Allocator a = ar.alloc();
  for (int i = 0; i < n; ++i) {
    if (live.empty() || rng() % 100 < 55) {
      uint64_t bs = Allocator::block_size_for(log_uniform(rng, max_bytes));
      BlockRef r = a.allocate(bs, UsedInit{++generation, 1, 0});
      if (!r.nil()) {
        live[r.bits()] = a.header(r)->size();
        continue;
      }
    }
    if (live.empty()) continue;
    auto it = live.begin();
    std::advance(it, rng() % std::min<size_t>(live.size(), 16));
    a.free(BlockRef::from_bits(it->first));
    live.erase(it);
  }
}

// 3a. The index is only an index: rebuilt from the chain alone it is whole.
TEST(allocator_rebuild_after_losing_the_index) {
  std::mt19937_64 rng(3);
  for (int round = 0; round < 8; ++round) {
    Arena ar({2u << 20, (2u << 20) + 5 * 64, 1u << 20});
    std::map<uint64_t, uint64_t> live;
    uint64_t generation = 0;
    random_ops(ar, rng, 100 + static_cast<int>(rng() % 20000), 128u << 10, live, generation);
    REQUIRE(verify_error(ar).empty());
    const auto chain_before = chain_of(ar);
    const auto lists_before = free_lists_of(ar);

    // The snapshot as a killed process would leave it, with everything that
    // is not the chain destroyed: the whole AllocState (zeros, or garbage),
    // every prev_size and every free block's links.
    std::unique_ptr<Arena> snap = ar.clone();
    if (round % 2 == 0) {
      std::memset(&snap->state(), 0, sizeof(AllocState));
    } else {
      auto* bytes = reinterpret_cast<unsigned char*>(&snap->state());
      for (size_t i = 0; i < sizeof(AllocState); ++i) bytes[i] = static_cast<unsigned char>(rng());
    }
    Allocator s = snap->alloc();
    for (const ChainBlock& b : chain_before) {
      BlockHeader* h = s.header(BlockRef::from_bits(b.ref_bits));
      h->prev_size = rng();
      if (!b.used) {
        h->free_links.next = rng();
        h->free_links.prev = rng();
      }
    }
    uint64_t kept = 0;
    Allocator::WalkTotals t = s.rebuild(snap->nsegs(), [&](BlockRef, BlockHeader&) {
      ++kept;
      return true;
    });
    CHECK_VERIFY(*snap);
    CHECK_EQ(kept, live.size());
    CHECK(chain_of(*snap) == chain_before);  // same used blocks: refs, sizes, generations
    CHECK(free_lists_of(*snap) == lists_before);
    const Allocator::WalkTotals expected = free_totals_of(chain_before);
    CHECK_EQ(t.free_bytes, expected.free_bytes);
    CHECK_EQ(t.free_blocks, expected.free_blocks);
    CHECK_EQ(t.largest_free, expected.largest_free);

    // The rebuilt index works: keep going, then free everything.
    random_ops(*snap, rng, 3000, 128u << 10, live, generation);
    CHECK_VERIFY(*snap);
    for (const auto& [bits, size] : live) snap->alloc().free(BlockRef::from_bits(bits));
    CHECK_VERIFY(*snap);
    for (uint32_t seg = 0; seg < snap->nsegs(); ++seg) CHECK(segment_is_empty(*snap, seg));
    CHECK(snap->canaries_ok());
  }
}

// 3b. A process really killed at a random instruction of an allocate or a
// free: the chain it leaves rebuilds into an index that passes verify, with
// every block whose allocation had completed (and whose free had not
// started) still used at the same ref with the same size.
struct KillLog {
  static constexpr uint32_t kSlots = 256;
  std::atomic<uint32_t> op;    // 0 idle, 1 allocating into `slot`, 2 freeing `slot`
  std::atomic<uint32_t> slot;  // the slot of the operation in flight
  std::atomic<uint64_t> done_ops;
  std::atomic<uint64_t> next_generation;
  std::atomic<uint64_t> ref[kSlots];  // BlockRef bits, kNilBits when empty
  std::atomic<uint64_t> size[kSlots];
};

int allocator_kill_child(Arena& ar, KillLog& log, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Allocator a = ar.alloc();
  for (;;) {
    uint32_t s = static_cast<uint32_t>(rng() % KillLog::kSlots);
    uint64_t bits = log.ref[s].load();
    log.slot.store(s);
    if (bits == BlockRef::kNilBits) {
      uint64_t bs = Allocator::block_size_for(log_uniform(rng, 32u << 10));
      log.op.store(1);
      BlockRef r = a.allocate(bs, UsedInit{log.next_generation.fetch_add(1), 1, 0});
      if (!r.nil()) {
        log.size[s].store(a.header(r)->size());
        log.ref[s].store(r.bits());
      }
    } else {
      log.op.store(2);
      a.free(BlockRef::from_bits(bits));
      log.ref[s].store(BlockRef::kNilBits);
    }
    log.op.store(0);
    log.done_ops.fetch_add(1, std::memory_order_relaxed);
  }
}

TEST(allocator_rebuild_after_kill_mid_operation) {
  Arena ar({512u << 10, (512u << 10) + 3 * 64, 256u << 10}, /*shared=*/true, sizeof(KillLog));
  auto* log = new (ar.extra()) KillLog();
  for (auto& r : log->ref) r.store(BlockRef::kNilBits);
  log->next_generation.store(1);
  Allocator a = ar.alloc();
  std::mt19937_64 rng(4);
  int mid_op = 0;
  for (int iter = 0; iter < 150; ++iter) {
    const uint64_t start = log->done_ops.load();
    const uint64_t seed = rng();
    pid_t pid = spawn([&] { return allocator_kill_child(ar, *log, seed); });
    // Let it run a random number of operations, then kill it wherever it is.
    const uint64_t target = start + 1 + rng() % 3000;
    auto t0 = Clock::now();
    while (log->done_ops.load() < target && seconds_since(t0) < 2) {
    }
    for (uint64_t spin = rng() % 20000; spin > 0; --spin) cpu_relax();
    ::kill(pid, SIGKILL);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);

    const uint32_t op = log->op.load(), slot = log->slot.load();
    mid_op += op != 0;
    std::map<uint64_t, uint64_t> used;
    try {
      a.rebuild(ar.nsegs(), [&](BlockRef r, BlockHeader& h) {
        used[r.bits()] = h.size();
        return true;
      });
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("rebuild: ") + e.what());
      return;
    }
    std::string err = verify_error(ar);
    if (!err.empty()) {
      record_failure(__FILE__, __LINE__,
                     "verify after a kill during op " + std::to_string(op) + " (iteration " +
                         std::to_string(iter) + "): " + err);
      return;
    }
    std::set<uint64_t> expected;
    for (uint32_t i = 0; i < KillLog::kSlots; ++i) {
      uint64_t bits = log->ref[i].load();
      if (bits == BlockRef::kNilBits || (op == 2 && i == slot)) continue;
      expected.insert(bits);
      auto it = used.find(bits);
      if (it == used.end() || it->second != log->size[i].load())
        record_failure(__FILE__, __LINE__, "a completed allocation was lost or resized");
    }
    std::vector<uint64_t> extra;
    for (const auto& [bits, size] : used)
      if (!expected.count(bits)) extra.push_back(bits);
    if (op == 2) {
      // The block being freed is either still used, whole, or gone.
      uint64_t bits = log->ref[slot].load();
      CHECK(extra.empty() ||
            (extra.size() == 1 && extra[0] == bits && used[bits] == log->size[slot].load()));
      if (extra.empty()) log->ref[slot].store(BlockRef::kNilBits);
    } else if (op == 1) {
      // The allocation in flight may or may not have committed.
      CHECK(extra.size() <= 1);
      if (extra.size() == 1 && log->ref[slot].load() == BlockRef::kNilBits) {
        log->size[slot].store(used[extra[0]]);
        log->ref[slot].store(extra[0]);  // adopt it: the next child frees it
      }
    } else {
      CHECK(extra.empty());
    }
    log->op.store(0);
    CHECK(ar.canaries_ok());
    if (g_failures) return;
  }
  CHECK(mid_op > 50);  // most kills did land inside an operation
  for (const ChainBlock& b : chain_of(ar))
    if (b.used) a.free(BlockRef::from_bits(b.ref_bits));
  CHECK_VERIFY(ar);
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg) CHECK(segment_is_empty(ar, seg));
}

// 4. rebuild() with a keep function that drops some used blocks.
TEST(allocator_rebuild_drops_blocks) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 20; ++round) {
    Arena ar({(1u << 20) + 64 * (rng() % 100), 256u << 10});
    Allocator a = ar.alloc();
    std::vector<BlockRef> refs;
    for (uint64_t g = 1;; ++g) {
      BlockRef r =
          a.allocate(Allocator::block_size_for(log_uniform(rng, 16u << 10)), UsedInit{g, 2, 0});
      if (r.nil()) break;
      refs.push_back(r);
    }
    // Some already free, so that dropped blocks meet free neighbours too.
    std::set<uint64_t> drop;
    for (BlockRef r : refs) {
      uint64_t x = rng() % 10;
      if (x < 2)
        a.free(r);
      else if (x < 6)
        drop.insert(r.bits());
    }
    const auto before = chain_of(ar);
    // Expected chain: kept blocks unchanged, every maximal run of free or
    // dropped blocks one free block.
    std::vector<ChainBlock> want;
    for (const ChainBlock& b : before) {
      bool stays = b.used && !drop.count(b.ref_bits);
      if (stays) {
        want.push_back(b);
      } else if (!want.empty() && !want.back().used &&
                 BlockRef::from_bits(want.back().ref_bits).seg() ==
                     BlockRef::from_bits(b.ref_bits).seg()) {
        want.back().size += b.size;
      } else {
        want.push_back({b.ref_bits, b.size, false, 0});
      }
    }
    uint64_t asked = 0, used_before = 0;
    for (const ChainBlock& b : before) used_before += b.used;
    Allocator::WalkTotals t = a.rebuild(ar.nsegs(), [&](BlockRef r, BlockHeader& h) {
      ++asked;
      if (drop.count(r.bits())) return false;
      h.pending = 7;  // the keep function may edit the header
      return true;
    });
    CHECK_EQ(asked, used_before);
    CHECK_VERIFY(ar);
    CHECK(chain_of(ar) == want);
    const Allocator::WalkTotals expected = free_totals_of(want);
    CHECK_EQ(t.free_bytes, expected.free_bytes);
    CHECK_EQ(t.free_blocks, expected.free_blocks);
    CHECK_EQ(t.largest_free, expected.largest_free);
    for (const ChainBlock& b : want)
      if (b.used) CHECK_EQ(a.header(BlockRef::from_bits(b.ref_bits))->pending, 7u);
    // The coalesced space is allocatable as one block.
    if (expected.largest_free >= 128) {
      BlockRef big = a.allocate(expected.largest_free, UsedInit{1000000, 0, 0});
      CHECK(!big.nil());
      CHECK_VERIFY(ar);
    }
  }
}

}  // namespace
}  // namespace pap::test
