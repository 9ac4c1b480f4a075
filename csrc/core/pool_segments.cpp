// The pool's data segments as this process sees them: mapping those other
// processes published, growing by a new one, retiring empty ones.

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
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

bool Pool::map_segment(uint32_t i, Mapping* out, uint64_t* nonce) {
  // Without the pool lock the number may be retired and reused while we
  // open it: (size, nonce) read again after the open must be unchanged, or
  // we look again. A grower stores the nonce before the size, so a size
  // read first comes with its own nonce or a newer one; under the lock
  // nothing changes and the first try is final.
  for (;;) {
    const uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_acquire);
    if (size == 0) return false;
    // Offsets are 48 bits (BlockRef); the file's size must match (open_segment).
    if (size > (uint64_t{1} << 48))
      throw CoreError(ErrorKind::kPool, "pool is corrupted: segment " + std::to_string(i) +
                                            " has a size of " + std::to_string(size) + " bytes");
    const uint64_t n = hdr_->segment_nonces[i].load(std::memory_order_acquire);
    auto unchanged = [&] {
      return hdr_->segment_sizes[i].load(std::memory_order_acquire) == size &&
             hdr_->segment_nonces[i].load(std::memory_order_acquire) == n;
    };
    bool found;
    try {
      found = open_segment(data_name(token_, i, n), size, size, out);
    } catch (const CoreError&) {
      if (unchanged()) throw;
      continue;  // a new segment of that number, still being made
    }
    if (!unchanged()) {
      *out = Mapping();
      continue;
    }
    if (!found)
      throw CoreError(ErrorKind::kPool, "segment " + data_name(token_, i, n) + " is missing");
    *nonce = n;
    return true;
  }
}

void Pool::ensure_mapped() {
  if (all_mapped()) return;
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t published = published_segments();
  for (uint32_t i = mapped_.load(std::memory_order_relaxed); i < published; ++i) {
    Mapping m;
    uint64_t nonce = 0;
    if (map_segment(i, &m, &nonce)) {
      spans_[i] = SegmentSpan{m.data(), m.size()};
      mappings_[i] = std::move(m);
    } else {
      spans_[i] = SegmentSpan{nullptr, 0};  // retired before this process mapped it
    }
    span_nonces_[i] = nonce;
    mapped_.store(i + 1, std::memory_order_release);
  }
}

std::string Pool::segment_name(uint32_t i) const {
  return data_name(token_, i, hdr_->segment_nonces[i].load(std::memory_order_acquire));
}

bool Pool::retirements_seen() const {
  return seen_retired_epoch_ == hdr_->retired_epoch.load(std::memory_order_acquire);
}

void Pool::remap_changed_segments() {
  if (retirements_seen()) return;
  const uint64_t epoch = hdr_->retired_epoch.load(std::memory_order_acquire);
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t n = mapped_.load(std::memory_order_relaxed);
  for (uint32_t i = 0; i < n; ++i) {
    const uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_acquire);
    const uint64_t nonce = hdr_->segment_nonces[i].load(std::memory_order_acquire);
    if (size != 0 && spans_[i].size != 0 && span_nonces_[i] == nonce) continue;
    if (size == 0 && !mappings_[i]) continue;
    // Retired, and maybe reused by a new segment (another nonce): our
    // mapping is of the old one. Unmapped first, so that its pages can go;
    // the last mapping frees them.
    spans_[i] = SegmentSpan{nullptr, 0};
    mappings_[i] = Mapping();
    span_nonces_[i] = 0;
    Mapping m;
    uint64_t mapped_nonce = 0;
    if (size != 0 && map_segment(i, &m, &mapped_nonce)) {
      spans_[i] = SegmentSpan{m.data(), m.size()};
      mappings_[i] = std::move(m);
      span_nonces_[i] = mapped_nonce;
    }
  }
  seen_retired_epoch_ = epoch;
}

uint64_t Pool::retire_free_segments_locked(uint64_t wanted) {
  // A segment holding nothing is one free block spanning all of it. Retire
  // such segments until `wanted` bytes of max_bytes are released: this lets
  // an emptied pool of small segments serve a request larger than any of
  // them. Other processes unmap a retired segment at their next locked
  // operation; its pages are punched out first, so they do not wait for that.
  Allocator a = allocator();
  uint64_t released = 0;
  uint32_t nsegs = published_segments();
  for (uint32_t i = 0; i < nsegs && released < wanted; ++i) {
    uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_relaxed);
    if (size == 0) continue;
    BlockHeader* h = a.header(BlockRef(i, 0));
    if (h->used() || h->size() != (spans_[i].size & kSizeMask)) continue;
    retire_segment_locked(i);  // pool_memory.cpp
    released += size;
  }
  return released;
}

void Pool::grow_locked(uint64_t block_size, uint64_t requested) {
  Counters& c = hdr_->counters;
  const PoolConfig cfg = config();
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
  const uint32_t count = published_segments();
  const uint32_t index = next_segment_number_locked();
  if (index >= BlockRef::kMaxSegments)
    throw CoreError(ErrorKind::kPoolFull, "the pool has reached its limit of " +
                                              std::to_string(BlockRef::kMaxSegments) +
                                              " segments, none of them empty");
  const bool reused = index < count;
  // What a process killed at this number left: the file of a retirer killed
  // before its unlink, or of a grower killed before publishing its size.
  // The nonce is stored before the file is created, so it names any such
  // file; nobody maps it (its size is 0 here), and the name is unlinked
  // before the nonce is replaced.
  if (const uint64_t left = hdr_->segment_nonces[index].load(std::memory_order_relaxed))
    ::shm_unlink(data_name(token_, index, left).c_str());  // best effort: it may be gone
  uint64_t nonce = 0;
  Mapping m;
  for (int collisions = 0;;) {
    try {
      // 0 means "none"; a reused number gets a name its old segment did not have.
      do nonce = random_u64();
      while (nonce == 0 || nonce == span_nonces_[index]);
      hdr_->segment_nonces[index].store(nonce, std::memory_order_release);
      // Only the first page (the header of the segment's one free block)
      // is reserved now; an allocation reserves the pages it hands out.
      if (create_segment(data_name(token_, index, nonce), size, &m, nullptr, kPageSize) ==
          CreateResult::kExists) {
        // 64 random bits collide with nothing by chance; someone made this
        // name on purpose. Never touch it (nor name it, for the unlink
        // above): draw again.
        hdr_->segment_nonces[index].store(0, std::memory_order_release);
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
                              " bytes, " + usage_locked() +
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
  mappings_[index] = std::move(m);  // a reused number: this process had unmapped the old one
  span_nonces_[index] = nonce;
  Allocator a = allocator();
  a.format_segment(index);
  if (reused) {
    // Epoch before size: a process that has this number unmapped (or the
    // retired segment still mapped) must remap before it may use it, even
    // if we are killed right after the size store. Nobody allocates from it
    // before add_segment (or a repair's rebuild) indexes it.
    hdr_->retired_epoch.fetch_add(1, std::memory_order_acq_rel);
    hdr_->segment_sizes[index].store(size, std::memory_order_release);
    seen_retired_epoch_ = hdr_->retired_epoch.load(std::memory_order_acquire);
  } else {
    hdr_->segment_sizes[index].store(size, std::memory_order_release);
    mapped_.store(index + 1, std::memory_order_release);
    hdr_->segment_count.store(index + 1, std::memory_order_release);
  }
  a.add_segment(index);
  c.capacity_bytes += size;
}

uint32_t Pool::next_segment_number_locked() const {
  // The lowest retired number, so that the numbers in use stay few and
  // never run out under a max_bytes that forces retirements; a new one only
  // when none is retired.
  const uint32_t count = hdr_->segment_count.load(std::memory_order_relaxed);
  for (uint32_t i = 0; i < count; ++i)
    if (hdr_->segment_sizes[i].load(std::memory_order_relaxed) == 0) return i;
  return count;
}

}  // namespace pap
