// The pool's data segments as this process sees them: mapping those other
// processes published, growing by a new one, retiring empty ones.

#include "core/pool_internal.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>

#include "core/errors.hpp"
#include "core/shm_segment.hpp"

namespace pap {

bool Pool::all_mapped() const {
  return mapped_.load(std::memory_order_acquire) ==
         hdr_->segment_count.load(std::memory_order_acquire);
}

uint32_t Pool::published_segments() const {
  const uint32_t n = hdr_->segment_count.load(std::memory_order_acquire);
  if (n > BlockRef::kMaxSegments || n < mapped_.load(std::memory_order_acquire))
    throw CoreError(ErrorKind::kPool, "pool is corrupted: its segment count " + std::to_string(n) +
                                          " is past the segment table (" +
                                          std::to_string(BlockRef::kMaxSegments) +
                                          ") or below what this process has mapped");
  return n;
}

void Pool::ensure_mapped() {
  if (all_mapped()) return;
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t published = published_segments();
  for (uint32_t i = mapped_.load(std::memory_order_relaxed); i < published; ++i) {
    uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_acquire);
    // Offsets are 48 bits (BlockRef); the file's size must match (open_segment).
    if (size > (uint64_t{1} << 48))
      throw CoreError(ErrorKind::kPool, "pool is corrupted: segment " + std::to_string(i) +
                                            " has a size of " + std::to_string(size) + " bytes");
    if (size == 0) {  // retired before this process ever mapped it
      spans_[i] = SegmentSpan{nullptr, 0};
      mapped_.store(i + 1, std::memory_order_release);
      continue;
    }
    Mapping m;
    if (!open_segment(segment_name(i), size, size, &m)) {
      if (hdr_->segment_sizes[i].load(std::memory_order_acquire) != 0)
        throw CoreError(ErrorKind::kPool, "segment " + segment_name(i) + " is missing");
      // Retired (and unlinked) while we were getting to it.
      spans_[i] = SegmentSpan{nullptr, 0};
      mapped_.store(i + 1, std::memory_order_release);
      continue;
    }
    spans_[i] = SegmentSpan{m.data(), m.size()};
    mappings_[i] = std::move(m);
    mapped_.store(i + 1, std::memory_order_release);
  }
}

std::string Pool::segment_name(uint32_t i) const {
  return data_name(token_, i, hdr_->segment_nonces[i].load(std::memory_order_acquire));
}

bool Pool::retirements_seen() const {
  return seen_retired_epoch_ == hdr_->retired_epoch.load(std::memory_order_acquire);
}

void Pool::unmap_retired() {
  if (retirements_seen()) return;
  const uint64_t epoch = hdr_->retired_epoch.load(std::memory_order_acquire);
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t n = mapped_.load(std::memory_order_relaxed);
  for (uint32_t i = 0; i < n; ++i) {
    if (spans_[i].size != 0 && hdr_->segment_sizes[i].load(std::memory_order_acquire) == 0) {
      spans_[i] = SegmentSpan{nullptr, 0};
      mappings_[i] = Mapping();  // unmapped: the last mapping frees the pages
    }
  }
  seen_retired_epoch_ = epoch;
}

uint64_t Pool::retire_free_segments_locked(uint64_t wanted) {
  // A segment holding nothing is one free block spanning all of it. Retire
  // such segments until `wanted` bytes of max_bytes are released: this lets
  // an emptied pool of small segments serve a request larger than any of
  // them. Other processes unmap a retired segment at their next locked
  // operation; until then its pages stay allocated in /dev/shm.
  Counters& c = hdr_->counters;
  Allocator a = allocator();
  uint64_t released = 0;
  uint32_t nsegs = published_segments();
  for (uint32_t i = 0; i < nsegs && released < wanted; ++i) {
    uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_relaxed);
    if (size == 0) continue;
    BlockHeader* h = a.header(BlockRef(i, 0));
    if (h->used() || h->size() != (spans_[i].size & kSizeMask)) continue;
    a.remove_segment(i);
    // Epoch first: a process killed right after the size store must still
    // leave survivors a reason to look (unmap_retired).
    hdr_->retired_epoch.fetch_add(1, std::memory_order_acq_rel);
    hdr_->segment_sizes[i].store(0, std::memory_order_release);
    c.capacity_bytes -= size;
    released += size;
    unlink_segment(segment_name(i));
    std::lock_guard<std::mutex> local(local_mutex_);
    spans_[i] = SegmentSpan{nullptr, 0};
    mappings_[i] = Mapping();
  }
  if (released) seen_retired_epoch_ = hdr_->retired_epoch.load(std::memory_order_acquire);
  return released;
}

void Pool::grow_locked(uint64_t block_size, uint64_t requested) {
  Counters& c = hdr_->counters;
  const PoolConfig cfg = hdr_->config;
  // Grow by segment_bytes; a request larger than that gets a segment of its
  // own. Whole pages: a segment's chain ends at its size.
  const uint64_t minimum = round_up(block_size, kPage);
  uint64_t size = std::max(round_up(cfg.segment_bytes, kPage), minimum);
  if (c.capacity_bytes + size > cfg.max_bytes) {
    // A smaller segment that still fits the request, if max_bytes allows,
    // after giving back segments that hold nothing.
    size = minimum;
    if (c.capacity_bytes + size > cfg.max_bytes)
      retire_free_segments_locked(c.capacity_bytes + size - cfg.max_bytes);
    if (c.capacity_bytes + size > cfg.max_bytes) throw_full(requested);
  }
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t index = published_segments();
  if (index >= BlockRef::kMaxSegments)
    throw CoreError(ErrorKind::kPoolFull, "the pool has reached its limit of segments");
  uint64_t nonce = 0;
  Mapping m;
  for (int collisions = 0;;) {
    try {
      nonce = random_u64();
      if (create_segment(data_name(token_, index, nonce), size, &m) == CreateResult::kExists) {
        // 64 random bits collide with nothing by chance; someone made this
        // name on purpose. Never touch it: draw again.
        if (++collisions > 8)
          throw CoreError(ErrorKind::kPool, "cannot create a data segment: names keep colliding");
        continue;
      }
      break;
    } catch (const CoreError& e) {
      // /dev/shm is smaller than a whole segment (Docker gives 64 MB):
      // settle for less, down to what the request needs.
      if (e.kind() != ErrorKind::kPoolFull || size <= minimum) {
        if (e.kind() == ErrorKind::kPoolFull)
          throw CoreError(ErrorKind::kPoolFull,
                          "pyarraypool cannot allocate " + std::to_string(requested) +
                              " bytes: /dev/shm has no room for them (" + e.what() + "; " +
                              shm_space() + "). The pool has " + std::to_string(c.capacity_bytes) +
                              " bytes in " + std::to_string(index) + " segments, " +
                              usage_locked() +
                              ". /dev/shm is the limit, not max_bytes: free space there, or "
                              "make it larger (docker run --shm-size=2g, or mount -o "
                              "remount,size=... /dev/shm)",
                          e.error_number());
        throw;
      }
      size = std::max(minimum, round_up(size / 2, kPage));
    }
  }
  spans_[index] = SegmentSpan{m.data(), m.size()};
  mappings_[index] = std::move(m);
  Allocator a = allocator();
  a.format_segment(index);
  hdr_->segment_nonces[index].store(nonce, std::memory_order_release);
  hdr_->segment_sizes[index].store(size, std::memory_order_release);
  mapped_.store(index + 1, std::memory_order_release);
  hdr_->segment_count.store(index + 1, std::memory_order_release);
  a.add_segment(index);
  c.capacity_bytes += size;
}

}  // namespace pap
