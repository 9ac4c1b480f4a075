#include "core/allocator.hpp"

#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#include "core/errors.hpp"

namespace pap {
namespace {

inline uint32_t log2_floor(uint64_t x) { return 63u - static_cast<uint32_t>(__builtin_clzll(x)); }

[[noreturn]] void corrupt(const std::string& what, BlockRef ref) {
  throw CoreError(ErrorKind::kPool, "pool is corrupted: " + what + " at segment " +
                                        std::to_string(ref.seg()) + " offset " +
                                        std::to_string(ref.off()));
}

void clear_used_fields(BlockHeader& h) {
  h.generation = 0;
  h.check = 0;
  h.pending = 0;
  h.flags = 0;
  h.pending_deadline_ns = 0;
}

// The union of two records: one range covering both (pages between them
// that are reserved count as maybe returned: safe), the later time.
[[gnu::always_inline]] inline FreeState merged(const FreeState& a, const FreeState& b) {
  FreeState m;
  if (!a.any_holes()) {
    m.lo = b.lo;
    m.hi = b.hi;
  } else if (!b.any_holes()) {
    m.lo = a.lo;
    m.hi = a.hi;
  } else {
    m.lo = std::min(a.lo, b.lo);
    m.hi = std::max(a.hi, b.hi);
    // Pages between two ranges that do not touch are reserved ones.
    m.mixed = a.hi < b.lo || b.hi < a.lo;
  }
  m.mixed = m.mixed || a.mixed || b.mixed;
  m.since_ms = std::max(a.since_ms, b.since_ms);
  return m;
}

// A block's interior minus its returned range is reserved: true if any.
bool has_reserved_interior(BlockRef ref, uint64_t size, const FreeState& s) {
  uint64_t lo, hi;
  Allocator::interior(ref, size, &lo, &hi);
  if (lo >= hi) return false;
  return s.mixed || !s.any_holes() || s.lo > lo || s.hi < hi;
}

}  // namespace

uint64_t coarse_now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000u + static_cast<uint64_t>(ts.tv_nsec) / 1'000'000u;
}

void Allocator::mapping_insert(uint64_t units, uint32_t& fl, uint32_t& sl) {
  if (units < kSlCount) {
    fl = 0;
    sl = static_cast<uint32_t>(units);
  } else {
    uint32_t f = log2_floor(units);
    fl = f - kSlLog2 + 1;
    sl = static_cast<uint32_t>(units >> (f - kSlLog2)) ^ kSlCount;
  }
}

bool Allocator::mapping_search(uint64_t units, uint32_t& fl, uint32_t& sl) {
  // Round up to the first size of the next class so that every block in the
  // class found is large enough.
  if (units >= kSlCount) units += (uint64_t{1} << (log2_floor(units) - kSlLog2)) - 1;
  mapping_insert(units, fl, sl);
  return fl < kFlCount;
}

uint64_t Allocator::block_size_for(uint64_t bytes) {
  if (bytes > (uint64_t{1} << 47)) return 0;
  return kHeaderSize + ((bytes + kAlign - 1) & ~(kAlign - 1));
}

void Allocator::reset() {
  st_.fl_bitmap = 0;
  std::memset(st_.sl_bitmap, 0, sizeof st_.sl_bitmap);
  for (auto& row : st_.heads)
    for (auto& h : row) h = BlockRef::kNilBits;
}

void Allocator::class_of(uint64_t size, uint32_t& fl, uint32_t& sl, BlockRef at) {
  if (size < kAlign) corrupt("bad block size", at);
  mapping_insert(size / kAlign, fl, sl);
  if (fl >= kFlCount) corrupt("block size past every size class", at);
}

BlockHeader* Allocator::free_block_at(uint64_t bits, BlockRef from) const {
  const BlockRef ref = BlockRef::from_bits(bits);
  const uint64_t end = chain_end(ref.seg());
  if (ref.off() % kAlign != 0 || ref.off() >= end)
    corrupt("free-list link " + std::to_string(bits) + " names no block of a mapped segment", from);
  BlockHeader* h = header(ref);
  const uint64_t size = h->size();
  if (h->used() || size < kAlign || size > end - ref.off())
    corrupt("free-list link names no free block", ref);
  return h;
}

uint64_t Allocator::max_list_length() const {
  uint64_t n = 0;
  for (uint32_t i = 0; i < nspans_; ++i) n += chain_end(i) / kAlign;
  return n;
}

void Allocator::check_links(BlockRef ref, uint64_t size) const {
  uint32_t fl, sl;
  class_of(size, fl, sl, ref);
  const BlockHeader* h = header(ref);
  const uint64_t next = h->free_links.next, prev = h->free_links.prev;
  if (next != BlockRef::kNilBits && free_block_at(next, ref)->free_links.prev != ref.bits())
    corrupt("broken back link", BlockRef::from_bits(next));
  if (prev != BlockRef::kNilBits ? free_block_at(prev, ref)->free_links.next != ref.bits()
                                 : st_.heads[fl][sl] != ref.bits())
    corrupt("free block not linked from its list", ref);
}

void Allocator::insert_free(BlockRef ref, uint64_t size) {
  uint32_t fl, sl;
  class_of(size, fl, sl, ref);
  const uint64_t head = st_.heads[fl][sl];
  BlockHeader* old = head != BlockRef::kNilBits ? free_block_at(head, ref) : nullptr;
  BlockHeader* h = header(ref);
  h->free_links.prev = BlockRef::kNilBits;
  h->free_links.next = head;
  if (old) old->free_links.prev = ref.bits();
  st_.heads[fl][sl] = ref.bits();
  st_.fl_bitmap |= uint64_t{1} << fl;
  st_.sl_bitmap[fl] |= 1u << sl;
}

void Allocator::remove_free(BlockRef ref, uint64_t size) {
  check_links(ref, size);  // every pointer below is then a checked free block
  uint32_t fl, sl;
  mapping_insert(size / kAlign, fl, sl);
  BlockHeader* h = header(ref);
  uint64_t next = h->free_links.next, prev = h->free_links.prev;
  if (next != BlockRef::kNilBits) header(BlockRef::from_bits(next))->free_links.prev = prev;
  if (prev != BlockRef::kNilBits) {
    header(BlockRef::from_bits(prev))->free_links.next = next;
  } else {
    st_.heads[fl][sl] = next;
    if (next == BlockRef::kNilBits) {
      st_.sl_bitmap[fl] &= ~(1u << sl);
      if (!st_.sl_bitmap[fl]) st_.fl_bitmap &= ~(uint64_t{1} << fl);
    }
  }
}

void Allocator::format_segment(uint32_t seg) {
  BlockHeader* h = header(BlockRef(seg, 0));
  std::memset(static_cast<void*>(h), 0, sizeof *h);
  h->prev_size = 0;
  const uint64_t size = spans_[seg].size & kSizeMask;
  h->commit_size(size, false);
  FreeState s;
  interior(BlockRef(seg, 0), size, &s.lo, &s.hi);
  set_free_state(BlockRef(seg, 0), size, s);
}

void Allocator::add_segment(uint32_t seg) {
  insert_free(BlockRef(seg, 0), header(BlockRef(seg, 0))->size());
}

void Allocator::remove_segment(uint32_t seg) {
  const BlockRef ref(seg, 0);
  remove_free(ref, free_block_at(ref.bits(), ref)->size());
}

BlockRef Allocator::first_fit_in_class(uint64_t block_size) const {
  uint32_t fl, sl;
  mapping_insert(block_size / kAlign, fl, sl);
  if (fl >= kFlCount) return BlockRef();
  const uint64_t limit = max_list_length();
  uint64_t steps = 0;
  for (uint64_t bits = st_.heads[fl][sl]; bits != BlockRef::kNilBits; ++steps) {
    if (steps > limit) corrupt("a free list runs in a cycle", BlockRef::from_bits(bits));
    const BlockHeader* h = free_block_at(bits, BlockRef());
    if (h->size() >= block_size) return BlockRef::from_bits(bits);
    bits = h->free_links.next;
  }
  return BlockRef();
}

void Allocator::pages_to_reserve(BlockRef ref, uint64_t have, uint64_t block_size,
                                 const FreeState& fs, uint64_t* lo, uint64_t* hi) {
  *lo = *hi = 0;
  if (!fs.any_holes()) return;
  const bool split = have - block_size >= kAlign;
  const uint64_t end = ref.off() + (split ? block_size + kHeaderSize : have);
  *lo = std::max(fs.lo, ref.off());
  *hi = std::min(fs.hi, (end + kPageSize - 1) & ~(kPageSize - 1));
}

BlockRef Allocator::reserved_fit(uint64_t block_size, uint32_t fl, uint32_t sl) const {
  // Bounded: this runs under the pool lock, and only instead of a system
  // call that reserves pages (which costs far more than these reads).
  constexpr uint64_t kMaxLooks = 64;
  const uint64_t limit = max_list_length();
  uint64_t looks = 0;
  for (; fl < kFlCount; ++fl, sl = 0) {
    if (!((st_.fl_bitmap >> fl) & 1)) continue;
    for (; sl < kSlCount; ++sl) {
      if (!((st_.sl_bitmap[fl] >> sl) & 1)) continue;
      uint64_t steps = 0;
      for (uint64_t bits = st_.heads[fl][sl]; bits != BlockRef::kNilBits; ++steps) {
        if (steps > limit) corrupt("a free list runs in a cycle", BlockRef::from_bits(bits));
        if (++looks > kMaxLooks) return BlockRef();
        const BlockHeader* h = free_block_at(bits, BlockRef());
        const BlockRef ref = BlockRef::from_bits(bits);
        const uint64_t have = h->size();
        if (have >= block_size) {
          uint64_t lo, hi;
          pages_to_reserve(ref, have, block_size, free_state(ref, have), &lo, &hi);
          if (lo >= hi) return ref;
        }
        bits = h->free_links.next;
      }
    }
  }
  return BlockRef();
}

BlockRef Allocator::allocate(uint64_t block_size, const UsedInit& init, PageReserver* reserver) {
  uint32_t fl, sl;
  if (!mapping_search(block_size / kAlign, fl, sl)) return BlockRef();
  uint32_t sl_map = st_.sl_bitmap[fl] & (~0u << sl);
  if (!sl_map) {
    uint64_t fl_map = fl + 1 < 64 ? st_.fl_bitmap & (~uint64_t{0} << (fl + 1)) : 0;
    if (fl_map) {
      fl = static_cast<uint32_t>(__builtin_ctzll(fl_map));
      // The bitmaps are shared memory: an index past the table is corruption.
      if (fl >= kFlCount || !(sl_map = st_.sl_bitmap[fl]))
        corrupt("first-level bitmap names an empty class", BlockRef());
    }
  }
  BlockRef ref;
  if (sl_map) {
    sl = static_cast<uint32_t>(__builtin_ctz(sl_map));
    const uint64_t head = st_.heads[fl][sl];
    if (head == BlockRef::kNilBits) corrupt("bitmap names an empty free list", BlockRef());
    ref = BlockRef::from_bits(head);
    if (free_block_at(head, BlockRef())->size() < block_size)
      corrupt("free block smaller than its size class", ref);
  } else {
    // Nothing in the classes above the request. Its own class (skipped by
    // the rounding) may still hold a block large enough; this linear search
    // runs only when the alternative is growing the pool or failing.
    ref = first_fit_in_class(block_size);
    if (ref.nil()) return ref;
  }
  uint64_t have = header(ref)->size();
  FreeState fs = free_state(ref, have);
  uint64_t lo, hi;
  pages_to_reserve(ref, have, block_size, fs, &lo, &hi);
  if (lo < hi) {
    // Another free block whose pages are all reserved serves as well,
    // without a system call, and keeps the reserved pages in use: taking
    // fresh pages while reserved ones sit free makes the footprint bound
    // give those back, to be reserved again at their next use.
    const BlockRef alt = reserved_fit(block_size, fl, sl);
    if (!alt.nil()) {
      ref = alt;
      have = header(ref)->size();
      fs = free_state(ref, have);
      lo = hi = 0;
    }
  }
  BlockHeader* h = header(ref);
  const bool split = have - block_size >= kAlign;
  // The pages handed out, and the page of a remainder's header, must be
  // reserved before anything is stored: a full /dev/shm fails here, with
  // the pool as it was, never with SIGBUS at the first touch.
  if (lo < hi && reserver && !reserver->reserve(ref, lo, hi)) return BlockRef();
  remove_free(ref, have);

  uint64_t size = have;
  if (split) {
    // Split: the remainder's header lies inside this block, invisible to a
    // chain walk until this block's size shrinks at the commit below.
    size = block_size;
    BlockRef rest(ref.seg(), ref.off() + size);
    BlockHeader* r = header(rest);
    r->prev_size = size;
    clear_used_fields(*r);
    // The remainder keeps what is left of the record (set_free_state clips
    // it to the remainder's interior), sealed before its commit.
    set_free_state(rest, have - size, fs);
    r->commit_size(have - size, false);
    if (has_next(rest, have - size))
      header(BlockRef(ref.seg(), ref.off() + have))->prev_size = have - size;
    insert_free(rest, have - size);
  }
  h->generation = init.generation;
  h->holders = 1;  // the allocating process (for a hold list: the list itself)
  h->list_owner = init.list_owner;
  h->unused_ = 0;
  h->pending = 0;
  h->flags = init.flags;
  h->pending_deadline_ns = 0;
  h->check = check_of(ref, init.generation);
  h->commit_size(size, true);  // commit: the block is used and (maybe) split
  return ref;
}

void Allocator::free(BlockRef ref) {
  BlockHeader* h = header(ref);
  const uint64_t end = chain_end(ref.seg());
  uint64_t size = h->size();
  if (size < kAlign || ref.off() >= end || size > end - ref.off()) corrupt("bad block size", ref);
  // The neighbours' sizes and links are checked before the first store: a
  // corrupt neighbour leaves this block used and the lists as they were.
  BlockHeader* n = nullptr;
  uint64_t nsize = 0;
  const BlockRef next(ref.seg(), ref.off() + size);
  if (has_next(ref, size) && !header(next)->used()) {
    n = header(next);
    nsize = n->size();
    if (nsize < kAlign || nsize > end - next.off()) corrupt("bad block size", next);
    check_links(next, nsize);
  }
  if (ref.off() != 0) {
    const uint64_t psize = h->prev_size;
    if (psize < kAlign || psize % kAlign != 0 || psize > ref.off()) corrupt("bad prev_size", ref);
    const BlockRef prev(ref.seg(), ref.off() - psize);
    const BlockHeader* p = header(prev);
    if (p->size() != psize) corrupt("prev_size disagrees with the previous block", ref);
    if (!p->used()) check_links(prev, psize);
  }
  // The freed block is reserved; its interior pages start being idle now
  // (a block of one page or less has none: no clock read on that path).
  FreeState st;
  if (size > kPageSize) st.since_ms = coarse_now_ms();
  if (n) {
    st = merged(st, free_state(next, nsize));
    remove_free(next, nsize);
    size += nsize;
  }
  h->commit_size(size, false);  // commit: free, merged with the next block
  // Only now, once the block is free: a process killed before the commit
  // must leave a used block that is still whole (generation and check
  // intact), and a free block's stale fields are never read. The fence keeps
  // the compiler from moving these stores above the commit.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  clear_used_fields(*h);
  if (ref.off() != 0) {
    BlockRef prev(ref.seg(), ref.off() - h->prev_size);
    BlockHeader* p = header(prev);
    if (!p->used()) {
      uint64_t psize = p->size();
      st = merged(st, free_state(prev, psize));
      remove_free(prev, psize);
      size += psize;
      p->commit_size(size, false);  // commit: merged into the previous block
      ref = prev;
      h = p;
    }
  }
  if (has_next(ref, size)) header(BlockRef(ref.seg(), ref.off() + size))->prev_size = size;
  set_free_state(ref, size, st);
  insert_free(ref, size);
}

Allocator::WalkTotals Allocator::rebuild(uint32_t nsegs, const KeepFn& keep, uint64_t now_ms) {
  if (nsegs > nspans_)
    corrupt("segment count " + std::to_string(nsegs) + " past the table", BlockRef());
  reset();
  WalkTotals totals;
  for (uint32_t seg = 0; seg < nsegs; ++seg) {
    const uint64_t end = chain_end(seg);
    BlockRef run;  // the free block being grown by coalescing, if any
    uint64_t run_size = 0, prev_size = 0;
    FreeState run_state;
    auto close_run = [&] {
      if (run.nil()) return;
      set_free_state(run, run_size, run_state);
      insert_free(run, run_size);
      totals.free_bytes += run_size;
      totals.free_blocks += 1;
      if (run_size > totals.largest_free) totals.largest_free = run_size;
      prev_size = run_size;
      run = BlockRef();
    };
    for (uint64_t off = 0; off < end;) {
      BlockRef ref(seg, off);
      BlockHeader* h = header(ref);
      uint64_t size = h->size();
      if (size < kAlign || size > end - off) corrupt("bad block size", ref);
      bool used = h->used();
      // Read before any merge changes the size its seal names.
      FreeState state = used ? FreeState{} : free_state(ref, size);
      if (used && !keep(ref, *h)) {
        h->commit_size(size, false);
        // Cleared after the commit, as in free().
        std::atomic_signal_fence(std::memory_order_seq_cst);
        clear_used_fields(*h);
        state = FreeState{0, 0, now_ms};  // it was used: every page reserved
        used = false;
      }
      if (used) {
        close_run();
        h->prev_size = prev_size;
        prev_size = size;
      } else if (run.nil()) {
        h->prev_size = prev_size;
        run = ref;
        run_size = size;
        run_state = state;
      } else {
        run_size += size;
        run_state = merged(run_state, state);
        header(run)->commit_size(run_size, false);
      }
      off += size;
    }
    close_run();
  }
  return totals;
}

BlockRef Allocator::find_idle(uint64_t due_ms, uint64_t* next_due_ms, BlockRef skip) const {
  uint64_t next = ~uint64_t{0};
  BlockRef found;
  uint32_t fl0, sl0;
  mapping_insert(2 * kPageSize / kAlign, fl0, sl0);
  const uint64_t limit = max_list_length();
  for (uint32_t fl = fl0; fl < kFlCount && found.nil(); ++fl) {
    if (!((st_.fl_bitmap >> fl) & 1)) continue;
    for (uint32_t sl = 0; sl < kSlCount && found.nil(); ++sl) {
      if (!((st_.sl_bitmap[fl] >> sl) & 1)) continue;
      uint64_t steps = 0;
      for (uint64_t bits = st_.heads[fl][sl]; bits != BlockRef::kNilBits; ++steps) {
        if (steps > limit) corrupt("a free list runs in a cycle", BlockRef::from_bits(bits));
        const BlockHeader* h = free_block_at(bits, BlockRef());
        const BlockRef ref = BlockRef::from_bits(bits);
        const FreeState s = free_state(ref, h->size());
        if (ref != skip && has_reserved_interior(ref, h->size(), s)) {
          if (s.since_ms <= due_ms) {
            found = ref;
            break;
          }
          next = std::min(next, s.since_ms);
        }
        bits = h->free_links.next;
      }
    }
  }
  if (next_due_ms) *next_due_ms = found.nil() ? next : 0;
  return found;
}

bool Allocator::mark_returned(BlockRef ref, uint64_t max_bytes, uint64_t* lo, uint64_t* hi) {
  const uint64_t size = free_block_at(ref.bits(), BlockRef())->size();
  FreeState s = free_state(ref, size);
  uint64_t ilo, ihi;
  interior(ref, size, &ilo, &ihi);
  max_bytes = std::max(max_bytes & ~(kPageSize - 1), kPageSize);
  if (s.mixed) {
    // Reserved pages may hide anywhere in the range: the whole interior
    // goes at once (punching pages already returned costs little), and the
    // record is exact from then on.
    if (ilo >= ihi) return false;
    *lo = ilo;
    *hi = ihi;
    s.lo = ilo;
    s.hi = ihi;
    s.mixed = false;
  } else if (!s.any_holes()) {
    // From the end down: the front is what the next allocation takes.
    if (ilo >= ihi) return false;
    *hi = ihi;
    *lo = ihi - std::min(ihi - ilo, max_bytes);
    s.lo = *lo;
    s.hi = *hi;
  } else if (s.hi < ihi) {
    *lo = s.hi;
    *hi = s.hi + std::min(ihi - s.hi, max_bytes);
    s.hi = *hi;
  } else if (s.lo > ilo) {
    *hi = s.lo;
    *lo = s.lo - std::min(s.lo - ilo, max_bytes);
    s.lo = *lo;
  } else {
    return false;
  }
  set_free_state(ref, size, s);
  return true;
}

uint64_t Allocator::largest_free() const {
  if (!st_.fl_bitmap) return 0;
  uint32_t fl = log2_floor(st_.fl_bitmap);
  if (fl >= kFlCount || !st_.sl_bitmap[fl])
    corrupt("first-level bitmap names an empty class", BlockRef());
  uint32_t sl = 31u - static_cast<uint32_t>(__builtin_clz(st_.sl_bitmap[fl]));
  uint64_t best = 0;
  const uint64_t limit = max_list_length();
  uint64_t steps = 0;
  for (uint64_t bits = st_.heads[fl][sl]; bits != BlockRef::kNilBits; ++steps) {
    if (steps > limit) corrupt("a free list runs in a cycle", BlockRef::from_bits(bits));
    const BlockHeader* h = free_block_at(bits, BlockRef());
    if (h->size() > best) best = h->size();
    bits = h->free_links.next;
  }
  return best;
}

void Allocator::for_each_block(uint32_t seg,
                               const std::function<void(BlockRef, const BlockHeader&)>& fn) const {
  const uint64_t end = chain_end(seg);
  for (uint64_t off = 0; off < end;) {
    BlockRef ref(seg, off);
    const BlockHeader* h = header(ref);
    uint64_t size = h->size();
    if (size < kAlign || size > end - off) corrupt("bad block size", ref);
    fn(ref, *h);
    off += size;
  }
}

void Allocator::verify(uint32_t nsegs) const {
  if (nsegs > nspans_) corrupt("segment count past the table", BlockRef());
  const uint64_t limit = max_list_length();
  uint64_t free_in_chain = 0;
  for (uint32_t seg = 0; seg < nsegs; ++seg) {
    uint64_t prev_size = 0;
    bool prev_free = false;
    for_each_block(seg, [&](BlockRef ref, const BlockHeader& h) {
      if (h.prev_size != prev_size) corrupt("prev_size does not match", ref);
      if (!h.used() && prev_free) corrupt("two adjacent free blocks", ref);
      if (h.used() && h.check != check_of(ref, h.generation))
        corrupt("header check does not match", ref);
      if (!h.used()) ++free_in_chain;
      prev_free = !h.used();
      prev_size = h.size();
    });
  }
  uint64_t free_in_lists = 0;
  for (uint32_t fl = 0; fl < kFlCount; ++fl) {
    for (uint32_t sl = 0; sl < kSlCount; ++sl) {
      uint64_t bits = st_.heads[fl][sl];
      bool bit = (st_.sl_bitmap[fl] >> sl) & 1;
      if (bit != (bits != BlockRef::kNilBits)) corrupt("bitmap disagrees with list", BlockRef());
      uint64_t prev = BlockRef::kNilBits;
      for (uint64_t steps = 0; bits != BlockRef::kNilBits; ++steps) {
        BlockRef ref = BlockRef::from_bits(bits);
        if (steps > limit) corrupt("a free list runs in a cycle", ref);
        const BlockHeader* h = free_block_at(bits, BlockRef());
        uint32_t f, s;
        mapping_insert(h->size() / kAlign, f, s);
        if (h->used()) corrupt("used block on a free list", ref);
        if (f != fl || s != sl) corrupt("free block on the wrong list", ref);
        if (h->free_links.prev != prev) corrupt("broken back link", ref);
        ++free_in_lists;
        prev = bits;
        bits = h->free_links.next;
      }
    }
    bool any = st_.sl_bitmap[fl] != 0;
    if (any != (((st_.fl_bitmap >> fl) & 1) != 0)) corrupt("first-level bitmap", BlockRef());
  }
  if (free_in_lists != free_in_chain) corrupt("free block missing from the lists", BlockRef());
}

}  // namespace pap
