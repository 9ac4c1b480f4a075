// Allocator tests: random allocate/free against a model of the live blocks,
// exact fits and nil, and the size classes.

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "allocator_arena.hpp"
#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "harness.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kAllocator;

// 1. Random allocate/free against a model of the live blocks.
TEST(allocator_random_ops_against_model) {
  // Odd sizes on purpose, one not a multiple of 64 (its last 8 bytes are
  // not part of any block, and nothing may be written there).
  Arena ar({4u << 20, (8u << 20) + 7 * 64 + 8, (16u << 20) - 4096, (3u << 20) + 320});
  CHECK_VERIFY(ar);
  Allocator a = ar.alloc();
  std::mt19937_64 rng(1);

  struct Live {
    BlockRef ref;
    uint64_t generation, requested, word;
  };
  std::vector<Live> live;
  std::map<uintptr_t, uintptr_t> ranges;  // block start address -> end address
  uint64_t generation = 0, nils = 0, allocs = 0, frees = 0;
  bool model_ok = true;

  for (int op = 0; op < 200000 && model_ok; ++op) {
    bool do_alloc = live.empty() || (rng() & 1);
    if (do_alloc) {
      uint64_t want = log_uniform(rng, 1u << 20);
      uint64_t bs = Allocator::block_size_for(want);
      ++generation;
      BlockRef r = a.allocate(bs, UsedInit{generation, 3, 0});
      if (r.nil()) {
        ++nils;
        bool fits = false;
        for (const ChainBlock& b : chain_of(ar)) fits |= !b.used && b.size >= bs;
        CHECK(!fits);  // nil only when no free block is large enough
        do_alloc = false;
      } else {
        ++allocs;
        BlockHeader* h = a.header(r);
        unsigned char* payload = h->payload();
        CHECK(r.seg() < ar.nsegs() && r.off() + h->size() <= ar.usable(r.seg()));
        CHECK(reinterpret_cast<uintptr_t>(payload) % 64 == 0);
        CHECK(h->capacity() >= want);
        CHECK_EQ(h->size(), bs);  // split to the exact block size
        CHECK(h->used());
        CHECK_EQ(h->generation, generation);
        CHECK_EQ(h->check, header_check(r.off(), generation, Arena::kCheckKey));
        CHECK(h->holders == 1 && h->list_owner == 3);
        CHECK(h->pending == 0 && h->flags == 0);
        uintptr_t begin = reinterpret_cast<uintptr_t>(h), end = begin + h->size();
        auto next = ranges.lower_bound(begin);
        bool overlap = (next != ranges.end() && next->first < end) ||
                       (next != ranges.begin() && std::prev(next)->second > begin);
        CHECK(!overlap);
        if (overlap) model_ok = false;
        ranges[begin] = end;
        uint64_t word = splitmix(r.bits() ^ (generation << 20));
        fill_pattern(payload, h->capacity(), word);
        live.push_back({r, generation, want, word});
      }
    }
    if (!do_alloc && !live.empty()) {
      size_t k = rng() % live.size();
      Live b = live[k];
      BlockHeader* h = a.header(b.ref);
      CHECK(h->used() && h->generation == b.generation);
      if (!check_pattern(h->payload(), h->capacity(), b.word)) {
        record_failure(__FILE__, __LINE__, "block content changed while it was live");
        model_ok = false;
      }
      ranges.erase(reinterpret_cast<uintptr_t>(h));
      a.free(b.ref);
      ++frees;
      live[k] = live.back();
      live.pop_back();
    }
    if (op % 1000 == 999) {
      std::string e = verify_error(ar);
      if (!e.empty()) {
        record_failure(__FILE__, __LINE__, "verify after op " + std::to_string(op) + ": " + e);
        model_ok = false;
      }
      if (!ar.canaries_ok()) {
        record_failure(__FILE__, __LINE__, "a write past the end of a segment");
        model_ok = false;
      }
      uint64_t largest = 0;
      for (const ChainBlock& b : chain_of(ar))
        if (!b.used) largest = std::max(largest, b.size);
      CHECK_EQ(a.largest_free(), largest);
    }
  }
  CHECK(nils > 0);  // the arena did fill up, so the nil path was exercised
  CHECK(allocs > 50000 && frees > 50000);
  for (const Live& b : live) {
    BlockHeader* h = a.header(b.ref);
    CHECK(check_pattern(h->payload(), h->capacity(), b.word));
    a.free(b.ref);
  }
  CHECK_VERIFY(ar);
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg) CHECK(segment_is_empty(ar, seg));
  CHECK(ar.canaries_ok());
  CHECK_EQ(a.largest_free(), ar.usable(2));
}

// A free block of exactly the requested size must be found, and nil comes
// back only when no free block is large enough.
TEST(allocator_exact_fit_and_nil) {
  // 1 MiB + 64 is not the first size of its class: a pure good-fit search
  // (rounding the request up to the next class) would skip such a block.
  const uint64_t bs = Allocator::block_size_for(1u << 20);
  {
    Arena ar({bs});
    Allocator a = ar.alloc();
    BlockRef r = a.allocate(bs, UsedInit{1, 0, 0});
    CHECK(!r.nil());
    if (!r.nil()) {
      CHECK_EQ(a.header(r)->size(), bs);
      CHECK(a.allocate(64, UsedInit{2, 0, 0}).nil());  // full
      a.free(r);
    }
    CHECK(a.allocate(bs + 64, UsedInit{3, 0, 0}).nil());  // larger than the segment
    CHECK(segment_is_empty(ar, 0));
    CHECK_VERIFY(ar);
  }
  {
    // Three blocks fill the segment; freeing the middle one leaves one hole
    // of exactly bs, and the same request must land in it.
    Arena ar({3 * bs});
    Allocator a = ar.alloc();
    BlockRef b[3];
    for (int i = 0; i < 3; ++i) {
      b[i] = a.allocate(bs, UsedInit{uint64_t(10 + i), 0, 0});
      REQUIRE(!b[i].nil());
    }
    a.free(b[1]);
    CHECK(a.allocate(bs + 64, UsedInit{20, 0, 0}).nil());
    BlockRef again = a.allocate(bs, UsedInit{21, 0, 0});
    CHECK(again == b[1]);
    CHECK_VERIFY(ar);
  }
  {
    // Many small holes, none large enough: nil, and nothing changes.
    Arena ar({1u << 20});
    Allocator a = ar.alloc();
    std::vector<BlockRef> refs;
    for (uint64_t g = 1;; ++g) {
      BlockRef r = a.allocate(Allocator::block_size_for(1000), UsedInit{g, 0, 0});
      if (r.nil()) break;
      refs.push_back(r);
    }
    REQUIRE(refs.size() > 100);
    for (size_t i = 0; i < refs.size(); i += 2) a.free(refs[i]);
    auto before = chain_of(ar);
    CHECK(a.allocate(Allocator::block_size_for(3000), UsedInit{99999, 0, 0}).nil());
    CHECK(chain_of(ar) == before);
    CHECK(!a.allocate(Allocator::block_size_for(900), UsedInit{99999, 0, 0}).nil());
    CHECK_VERIFY(ar);
  }
  CHECK_EQ(Allocator::block_size_for(0), 64u);
  CHECK_EQ(Allocator::block_size_for(1), 128u);
  CHECK_EQ(Allocator::block_size_for(64), 128u);
  CHECK_EQ(Allocator::block_size_for(65), 192u);
  CHECK_EQ(Allocator::block_size_for(uint64_t{1} << 60), 0u);  // overflow
}

// 2. Size classes.
uint64_t class_start(uint32_t fl, uint32_t sl) {
  return fl == 0 ? sl : uint64_t{kSlCount + sl} << (fl - 1);
}

TEST(allocator_size_classes) {
  auto check_unit = [](uint64_t u) {
    uint32_t fl = 99, sl = 99;
    const bool fits = u <= (uint64_t{2 * kSlCount - 1} << (kFlCount - 2));  // last class start
    bool ok = Allocator::mapping_search(u, fl, sl);
    if (ok != fits) {
      record_failure(__FILE__, __LINE__,
                     "mapping_search(" + std::to_string(u) + ") returned " + show(ok));
      return;
    }
    if (ok) {
      if (fl >= kFlCount || sl >= kSlCount) {
        record_failure(__FILE__, __LINE__, "class out of range for " + std::to_string(u));
        return;
      }
      uint64_t start = class_start(fl, sl);
      // Every member of the class found is >= u, and the rounding wastes at
      // most 1/32.
      if (start < u || (u >= kSlCount && start - u > u / kSlCount) || (u < kSlCount && start != u))
        record_failure(__FILE__, __LINE__,
                       "mapping_search(" + std::to_string(u) + ") gave a class starting at " +
                           std::to_string(start));
    }
    if (u < (uint64_t{1} << 44)) {
      uint32_t ifl, isl;
      Allocator::mapping_insert(u, ifl, isl);
      uint64_t lo = class_start(ifl, isl);
      uint64_t hi = ifl == 0 ? lo + 1 : lo + (uint64_t{1} << (ifl - 1));
      if (!(lo <= u && u < hi) || ifl >= kFlCount)
        record_failure(__FILE__, __LINE__,
                       "mapping_insert(" + std::to_string(u) + ") gave class [" +
                           std::to_string(lo) + ", " + std::to_string(hi) + ")");
    }
  };
  for (uint64_t u = 1; u <= 1000000; ++u) check_unit(u);
  for (uint32_t k = 0; k <= 47; ++k) {
    uint64_t p = uint64_t{1} << k;
    check_unit(p);
    check_unit(p + 1);
    if (p > 1) check_unit(p - 1);
  }
  const uint64_t last = uint64_t{2 * kSlCount - 1} << (kFlCount - 2);
  check_unit(last);
  check_unit(last + 1);
  uint32_t fl, sl;
  CHECK(!Allocator::mapping_search(last + 1, fl, sl));
  // Requests that cannot be classed come back nil, not as a wrong block.
  Arena ar({1u << 20});
  CHECK(ar.alloc().allocate((last + 1) * kAlign, UsedInit{1, 0, 0}).nil());
  CHECK(ar.alloc().allocate(uint64_t{1} << 47, UsedInit{1, 0, 0}).nil());
  CHECK(segment_is_empty(ar, 0));
}

}  // namespace
}  // namespace pap::test
