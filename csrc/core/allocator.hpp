// A two-level segregated-fit (TLSF) allocator over the pool's segments.
//
// Allocation and free are O(1): sizes map to (first level = power of two,
// second level = one of 32 slices of it); two bitmaps find a non-empty free
// list of a large enough class in two count-trailing-zero instructions. A
// request is rounded up to the start of the next class, so any block on the
// list found fits ("good fit"); waste inside a class is at most 1/32. Only
// when no such class has a block does allocate() look through the list of
// the request's own class, whose blocks may or may not fit: without that, a
// free block of exactly the size asked for (the hole left by an array of
// the same shape, a segment grown for this very request) would be missed.
//
// Crash consistency. A process can be killed between any two stores. The
// free lists and bitmaps are only an index: recovery rebuilds them from the
// physical chain of blocks in each segment, walked from offset 0 by block
// size. Every operation therefore changes the chain by single 8-byte stores
// of `size_flags` (the commit points), each of which takes the chain from one
// consistent state to another; everything else it writes is either invisible
// until the commit (a new header inside a block not yet split) or recomputed
// by the walk (`prev_size`, the lists).
//
// Untrusted words. Everything read from shared memory (free-list links, the
// heads and bitmaps, block sizes, prev_size) is checked before it becomes a
// pointer or an index: a link must name a mapped segment, be 64-aligned, lie
// inside the segment and name a free block that links back; sizes must stay
// inside their segment; walks along a list stop after as many steps as the
// segments could hold blocks (a cycle). Anything else throws
// CoreError(kPool) ("pool is corrupted"), never a wild read or write. The
// checks are O(1) per link, so allocate and free stay O(1).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#include "core/block_header.hpp"

namespace pap {

constexpr uint32_t kSlLog2 = 5;
constexpr uint32_t kSlCount = 1u << kSlLog2;
constexpr uint32_t kFlCount = 40;  // enough for blocks up to 2^48 bytes

// The allocator's index, kept in shared memory.
struct AllocState {
  uint64_t fl_bitmap;
  uint32_t sl_bitmap[kFlCount];
  uint64_t heads[kFlCount][kSlCount];  // BlockRef bits, kNilBits when empty
};

// Where a segment is mapped in this process.
struct SegmentSpan {
  unsigned char* base;
  uint64_t size;
};

// Fields given to a block as it becomes used, written before the commit.
struct UsedInit {
  uint64_t generation;
  uint32_t list_owner;  // BlockHeader::list_owner: 0 for an array's block
  uint32_t flags;
};

// Reserves the pages an allocation is about to hand out (see FreeState).
class PageReserver {
 public:
  // Reserves [lo, hi) (whole pages) of the segment of free block `block`,
  // which the allocation is about to take. False: not now (a caller that
  // makes no system call); allocate() then changes nothing. Throws
  // CoreError(kPoolFull) if /dev/shm has no room.
  virtual bool reserve(BlockRef block, uint64_t lo, uint64_t hi) = 0;

 protected:
  ~PageReserver() = default;
};

// Coarse CLOCK_MONOTONIC milliseconds (FreeState::since_ms).
uint64_t coarse_now_ms();

class Allocator {
 public:
  // `spans` has `nspans` entries; an entry of size 0 is no segment (not
  // mapped, or retired). `check_key` is the pool's secret that keys the
  // used blocks' `check` (header_check).
  Allocator(AllocState& state, const SegmentSpan* spans, uint32_t nspans, uint64_t check_key)
      : st_(state), spans_(spans), nspans_(nspans), key_(check_key) {}

  // Empties the index (a new pool).
  void reset();

  // Writes one free block covering segment `seg` (already mapped, not yet
  // published to other processes) without indexing it. Its pages past the
  // first one (which holds its header) are recorded as not reserved.
  void format_segment(uint32_t seg);
  // Indexes the free block covering a formatted segment.
  void add_segment(uint32_t seg);

  // Takes the free block covering a whole segment out of the index (the
  // segment is being given back).
  void remove_segment(uint32_t seg);

  // Block size (header included) for a payload of `bytes`; 0 on overflow.
  static uint64_t block_size_for(uint64_t bytes);

  // A used block of at least `block_size` bytes, or a nil ref if no free
  // block is large enough (or `reserver` declined). Pages of the block that
  // its free record says may be returned are reserved through `reserver`
  // first (nullptr: the memory is reserved already, as anonymous memory is).
  BlockRef allocate(uint64_t block_size, const UsedInit& init, PageReserver* reserver = nullptr);

  // Returns a used block to the free lists, merging it with free neighbours.
  void free(BlockRef ref);

  // The header at `ref`, which the caller has checked (or made itself).
  BlockHeader* header(BlockRef ref) const {
    return reinterpret_cast<BlockHeader*>(spans_[ref.seg()].base + ref.off());
  }
  uint64_t check_of(BlockRef ref, uint64_t generation) const {
    return header_check(ref.off(), generation, key_);
  }

  // Decides the fate of a used block during a rebuild: true keeps it, false
  // frees it. It may edit the header (holders, pending).
  using KeepFn = std::function<bool(BlockRef, BlockHeader&)>;

  struct WalkTotals {
    uint64_t free_bytes = 0;
    uint64_t free_blocks = 0;
    uint64_t largest_free = 0;
  };
  // Walks the physical chain of segments [0, nsegs), asks `keep` about every
  // used block, coalesces free neighbours, fixes `prev_size` and rebuilds the
  // index from scratch. Throws CoreError(kPool) if a chain is broken.
  // Free blocks merged here keep the union of their records; a used block
  // freed here is reserved, free since `now_ms`.
  WalkTotals rebuild(uint32_t nsegs, const KeepFn& keep, uint64_t now_ms = 0);

  // A free block's record of its memory (see FreeState), or the safe
  // default (every interior page may be returned) if its seal is wrong.
  FreeState free_state(BlockRef ref, uint64_t size) const;
  // Whole pages after the page of the block's header, up to the page of
  // the next block's: the pages a free block can give back.
  static void interior(BlockRef ref, uint64_t size, uint64_t* lo, uint64_t* hi);

  // Giving idle memory back (decay). A free block of at least two pages
  // whose reserved interior pages have been free since `since_ms` <= `due_ms`.
  // `next_due_ms` (if not null) gets the earliest since_ms of the others
  // that have reserved interior pages (or ~0). O(free blocks of two pages
  // and more).
  // `skip`: a block not to name (one being allocated).
  BlockRef find_idle(uint64_t due_ms, uint64_t* next_due_ms, BlockRef skip = BlockRef()) const;
  // Records up to `max_bytes` of the reserved interior of free block `ref`,
  // next to its returned range, as returned, and gives that range in
  // [*lo, *hi) for the caller to punch (under the same lock hold): the
  // record says "returned" before the pages are, never after.
  bool mark_returned(BlockRef ref, uint64_t max_bytes, uint64_t* lo, uint64_t* hi);

  // Size of the largest free block, from the index: O(length of one list).
  uint64_t largest_free() const;

  // Calls `fn` for each block of segment `seg` in address order.
  void for_each_block(uint32_t seg,
                      const std::function<void(BlockRef, const BlockHeader&)>& fn) const;

  // Debug check of every invariant of the index against the chain; throws
  // CoreError(kPool) naming the first one broken. O(blocks).
  void verify(uint32_t nsegs) const;

  // Size-class mapping, exposed for tests.
  static void mapping_insert(uint64_t units, uint32_t& fl, uint32_t& sl);
  static bool mapping_search(uint64_t units, uint32_t& fl, uint32_t& sl);

 private:
  void set_free_state(BlockRef ref, uint64_t size, const FreeState& s);
  uint64_t seal_of(BlockRef ref, uint64_t size, const FreeState& s) const;
  void insert_free(BlockRef ref, uint64_t size);
  void remove_free(BlockRef ref, uint64_t size);
  // The free block a link read from shared memory names, after checking
  // that it is one (throws kPool otherwise). `from` is reported.
  BlockHeader* free_block_at(uint64_t bits, BlockRef from) const;
  // The end of segment `seg`'s chain; 0 for no segment.
  uint64_t chain_end(uint32_t seg) const {
    return seg < nspans_ && spans_[seg].base ? spans_[seg].size & kSizeMask : 0;
  }
  // A size-class index computed from a size read from shared memory.
  static void class_of(uint64_t size, uint32_t& fl, uint32_t& sl, BlockRef at);
  // Throws unless `ref`'s free-list neighbours link back to it (checked
  // before remove_free's first store).
  void check_links(BlockRef ref, uint64_t size) const;
  // No list holds more blocks than the segments could: a longer walk is a cycle.
  uint64_t max_list_length() const;
  BlockRef first_fit_in_class(uint64_t block_size) const;
  // The pages [lo, hi) that handing out `block_size` bytes from the front
  // of free block `ref` (of `have` bytes, record `fs`) would have to
  // reserve first: the block's own pages and a remainder's header page.
  // Empty (lo >= hi) when they all are reserved already.
  static void pages_to_reserve(BlockRef ref, uint64_t have, uint64_t block_size,
                               const FreeState& fs, uint64_t* lo, uint64_t* hi);
  // A free block of at least `block_size` bytes, in class (fl, sl) or
  // above, that needs no page reserved; nil if a bounded walk finds none.
  BlockRef reserved_fit(uint64_t block_size, uint32_t fl, uint32_t sl) const;
  // The chain ends at the segment size rounded down to kAlign (see
  // format_segment): a segment whose size is not a multiple of 64 has a
  // tail that is no block, and no header may be written there.
  bool has_next(BlockRef ref, uint64_t size) const {
    return ref.off() + size < (spans_[ref.seg()].size & kSizeMask);
  }

  AllocState& st_;
  const SegmentSpan* spans_;
  uint32_t nspans_;
  uint64_t key_;
};

// The free-page record's accessors run on every allocate and free next to a
// large free block (a segment's tail): defined here so that they inline.
inline void Allocator::interior(BlockRef ref, uint64_t size, uint64_t* lo, uint64_t* hi) {
  *lo = (ref.off() + kHeaderSize + kPageSize - 1) & ~(kPageSize - 1);
  *hi = (ref.off() + size) & ~(kPageSize - 1);
  if (*hi < *lo) *hi = *lo;
}

inline uint64_t Allocator::seal_of(BlockRef ref, uint64_t size, const FreeState& s) const {
  // Not secret, only a consistency check: a header whose stores were cut
  // short by a kill, or that belongs to another block, does not pass. It
  // runs on every allocate and free next to a large free block (a
  // segment's tail), so independent multiplies the CPU overlaps, not
  // header_check's chain of them.
  const uint64_t since = s.since_ms | (s.mixed ? kMixedBit : 0);
  return (key_ + 0x5EA1) ^ (ref.bits() * 0xC2B2AE3D27D4EB4Full) ^ (size * 0x9E3779B97F4A7C15ull) ^
         (s.lo * 0xBF58476D1CE4E5B9ull) ^ (s.hi * 0x94D049BB133111EBull) ^
         (since * 0xD6E8FEB86659FD93ull);
}

inline FreeState Allocator::free_state(BlockRef ref, uint64_t size) const {
  uint64_t lo, hi;
  interior(ref, size, &lo, &hi);
  if (lo >= hi) return FreeState{};  // no whole page: nothing to record (small blocks)
  const BlockHeader* h = header(ref);
  FreeState s{h->holes_lo, h->holes_hi, h->free_since_ms & ~kMixedBit,
              (h->free_since_ms & kMixedBit) != 0};
  const bool sane = s.lo % kPageSize == 0 && s.hi % kPageSize == 0 &&
                    (!s.any_holes() ? s.lo == 0 && s.hi == 0 : s.lo >= lo && s.hi <= hi);
  if (sane && h->free_seal == seal_of(ref, size, s)) return s;
  FreeState safe;  // every interior page may be returned, or may not
  safe.lo = lo;
  safe.hi = hi;
  safe.mixed = true;
  return safe;
}

inline void Allocator::set_free_state(BlockRef ref, uint64_t size, const FreeState& s) {
  uint64_t lo, hi;
  interior(ref, size, &lo, &hi);
  if (lo >= hi) return;  // no whole page: free_state() reads nothing here
  BlockHeader* h = header(ref);
  FreeState c = s;
  c.lo = std::max(c.lo, lo);
  c.hi = std::min(c.hi, hi);
  if (c.lo >= c.hi) {
    c.lo = c.hi = 0;
    c.mixed = false;  // no range, nothing hidden in it
  }
  c.since_ms &= ~kMixedBit;
  h->holes_lo = c.lo;
  h->holes_hi = c.hi;
  h->free_since_ms = c.since_ms | (c.mixed ? kMixedBit : 0);
  h->free_seal = seal_of(ref, size, c);
}

}  // namespace pap
