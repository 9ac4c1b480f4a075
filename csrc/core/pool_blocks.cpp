// Blocks: allocate, release, count a pickle in flight, take a hold from a
// handle. Each runs under the pool lock (kFast tries it once).

#include <algorithm>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
#include "core/pool_snapshot.hpp"
#include "core/shm_segment.hpp"

namespace pap {

std::optional<Block> Pool::allocate(uint64_t bytes, uint32_t flags, Mode mode) {
  Reserved reserved;
  std::optional<Block> b = allocate_guarded(bytes, flags, mode, &reserved);
  if (b && reserved.len) populate_reserved(reserved);
  return b;
}

std::optional<Block> Pool::allocate_guarded(uint64_t bytes, uint32_t flags, Mode mode,
                                            Reserved* reserved) {
  flags &= kFlagTransferRequired | kFlagPrivate;
  uint64_t block_size = Allocator::block_size_for(bytes);
  if (block_size == 0)
    throw CoreError(ErrorKind::kPoolFull, "pyarraypool cannot allocate " + std::to_string(bytes) +
                                              " bytes: larger than any block can be");
  // No cache while a fork is under way: the child must hold every block.
  if (mode == Mode::kFast && cache_.bytes() != 0 && child_slot_.load(std::memory_order_relaxed) < 0)
    if (auto b = cache_.take(bytes, flags)) return b;
  Guard g(*this, mode);
  if (!g.held()) return std::nullopt;
  // Room in our hold list first: once the block is ours, naming it there
  // must not fail.
  if (!reserve_hold_locked(mode)) return std::nullopt;
  if (mode == Mode::kFast) return allocate_locked(block_size, flags, mode, bytes, reserved);
  try {
    if (auto b = allocate_locked(block_size, flags, mode, bytes, reserved)) return b;
  } catch (const CoreError& e) {
    // /dev/shm had no room for the pages of the block found. What dead
    // processes held may be free pages (reserved already) that serve it.
    if (e.kind() != ErrorKind::kPoolFull || maintain_locked(false) == 0) throw;
    if (auto b = allocate_locked(block_size, flags, mode, bytes, reserved)) return b;
  }
  // Out of room: first take back what dead processes and expired pickles
  // hold, then grow by a segment.
  if (maintain_locked(false) > 0)
    if (auto b = allocate_locked(block_size, flags, mode, bytes, reserved)) return b;
  grow_locked(block_size, bytes);
  if (auto b = allocate_locked(block_size, flags, mode, bytes, reserved)) return b;
  throw_full(bytes);
}

std::optional<Block> Pool::allocate_locked(uint64_t block_size, uint32_t flags, Mode mode,
                                           uint64_t requested, Reserved* reserved) {
  Counters& c = hdr_->counters;
  UsedInit init{c.next_generation, 0, flags};
  Allocator a = allocator();
  Reserver reserver(*this, mode, requested, reserved);
  BlockRef ref = a.allocate(block_size, init, &reserver);
  if (ref.nil()) return std::nullopt;
  ++c.next_generation;
  BlockHeader* h = a.header(ref);
  add_hold_locked(ref, init.generation, *h, /*counted=*/true);
  c.used_bytes += h->size();
  // The peak of the footprint window (keep_footprint_locked).
  const uint64_t live = live_bytes_locked();
  if (live > c.peak_used_bytes) c.peak_used_bytes = live;
  ++c.live_blocks;
  return Block{ref, init.generation, h->payload(), h->capacity(), init.flags};
}

std::string Pool::usage_locked() {
  try {
    PoolSnapshot s;
    snapshot_locked(&s);
    return "in use: " + describe_usage(s);
  } catch (const std::exception&) {
    return "in use: unknown (could not walk the pool)";
  }
}

void Pool::throw_full(uint64_t bytes) {
  const Counters& c = hdr_->counters;
  const PoolConfig cfg = config();
  const std::string state =
      "the pool uses " + std::to_string(c.used_bytes) + " (" + human_bytes(c.used_bytes) +
      ") of max_bytes=" + std::to_string(cfg.max_bytes) + " (" + human_bytes(cfg.max_bytes) +
      ") in " + std::to_string(c.live_blocks) + " live blocks; capacity " +
      std::to_string(c.capacity_bytes) + " bytes, largest free block " +
      std::to_string(allocator().largest_free()) + " bytes; " + usage_locked() + "; " + shm_space();
  // max_bytes defaults to the size of /dev/shm, so in a small one (Docker
  // gives 64 MB) the request often hits max_bytes and /dev/shm at once.
  // Raising max_bytes cannot help when /dev/shm has no room for the pages
  // the request needs: then /dev/shm is what to make larger.
  const uint64_t segment = round_up(Allocator::block_size_for(bytes), kPage);
  const ShmSpace shm = shm_usage();
  if (shm.known && shm.free_bytes < segment) {
    std::string advice = ". /dev/shm is the limit, not max_bytes: this request needs " +
                         std::to_string(segment) +
                         " bytes. Make /dev/shm larger (docker run --shm-size=2g, or "
                         "mount -o remount,size=... /dev/shm); max_bytes defaults to its size";
    if (cfg.max_bytes < shm.total_bytes)
      advice += ", and was set lower here: raise it as well (PYARRAYPOOL_MAX_BYTES)";
    throw CoreError(ErrorKind::kPoolFull, "pyarraypool cannot allocate " + std::to_string(bytes) +
                                              " bytes: " + state + advice +
                                              "; or drop arrays and load pending pickles");
  }
  throw CoreError(
      ErrorKind::kPoolFull,
      "pyarraypool cannot allocate " + std::to_string(bytes) + " bytes: " + state +
          ". Raise max_bytes with pyarraypool.configure(max_bytes=...) or PYARRAYPOOL_MAX_BYTES"
          " (before the program first uses the pool), or drop arrays and load pending pickles");
}

BlockHeader* Pool::find_header(BlockRef ref, uint64_t generation) {
  if (ref.seg() >= mapped_.load(std::memory_order_acquire)) return nullptr;
  const SegmentSpan& s = spans_[ref.seg()];
  const uint64_t end = s.size & kSizeMask;  // where the chain of blocks ends
  if (s.size == 0 || ref.off() % kAlign != 0 || ref.off() + kHeaderSize > end) return nullptr;
  BlockHeader* h = allocator().header(ref);
  // The size is checked too: it bounds every view of the block (capacity).
  // A hold list is no array: no handle may name one.
  if (!h->used() || h->generation != generation || (h->flags & kFlagHoldList) ||
      h->check != header_check(ref.off(), generation, check_key_) || h->size() < kHeaderSize ||
      h->size() > end - ref.off())
    return nullptr;
  return h;
}

BlockHeader* Pool::checked_header(BlockRef ref, uint64_t generation) {
  if (BlockHeader* h = find_header(ref, generation)) return h;
  // Why not, in the words the caller's user needs.
  if (ref.seg() >= mapped_.load(std::memory_order_acquire))
    throw CoreError(ErrorKind::kStaleHandle, "handle names a segment this pool does not have");
  const SegmentSpan& s = spans_[ref.seg()];
  if (s.size == 0)
    throw CoreError(ErrorKind::kStaleHandle, "handle names a segment the pool has given back");
  const uint64_t end = s.size & kSizeMask;  // where the chain of blocks ends
  if (ref.off() % kAlign != 0 || ref.off() + kHeaderSize > end)
    throw CoreError(ErrorKind::kInvalidHandle, "handle points outside its segment");
  throw CoreError(
      ErrorKind::kStaleHandle,
      "the block this handle names has been freed (generation " + std::to_string(generation) + ")");
}

void Pool::free_if_unused(BlockRef ref, BlockHeader& h) {
  if (h.holders > 0 || h.pending > 0) return;
  Counters& c = hdr_->counters;
  const uint64_t size = h.size();
  c.used_bytes -= size;
  --c.live_blocks;
  allocator().free(ref);
  if (size > kPageSize) note_freed_locked();
}

bool Pool::release_unshared(const Block& b, Mode mode) {
  if (mode == Mode::kFast && child_slot_.load(std::memory_order_relaxed) < 0 && cache_.put(b))
    return true;
  return release(b.ref, b.generation, mode);
}

void Pool::drain_cache_locked() {
  cache_.drain(
      [&](const Block& b) { drop_hold_locked(b.ref, *checked_header(b.ref, b.generation)); });
}

bool Pool::release(BlockRef ref, uint64_t generation, Mode mode) {
  Guard g(*this, mode);
  if (!g.held()) return false;
  drop_hold_locked(ref, *checked_header(ref, generation));
  return true;
}

bool Pool::add_pending(BlockRef ref, uint64_t generation, Mode mode) {
  Guard g(*this, mode);
  if (!g.held()) return false;
  BlockHeader* h = checked_header(ref, generation);
  if (!(h->flags & kFlagTransferRequired)) return true;
  Counters& c = hdr_->counters;
  if (h->pending == 0) ++c.pending_blocks;
  ++h->pending;
  ++c.pending_transfers;
  h->flags = with_sender(h->flags, pid_);
  // One deadline per block: the newest pickle's. Older pickles of the same
  // block live at least as long as the newest one.
  h->pending_deadline_ns = monotonic_ns() + hdr_->config.transfer_timeout_ns;
  c.next_expiry_ns = c.pending_blocks == 1 ? h->pending_deadline_ns
                                           : std::min(c.next_expiry_ns, h->pending_deadline_ns);
  return true;
}

// Why a handle of another pool cannot load, and what to do instead: the
// usual cause is a pickle kept (in a file, a cache, a queue) past its pool.
static std::string foreign_handle_message(bool same_token) {
  return std::string(same_token ? "this handle was made by another pool of the same name (an "
                                  "earlier one, which has ended, or one on another host or in "
                                  "another container)"
                                : "this handle belongs to another pool") +
         ": a pickle of a pool array is a handle to the pool's shared memory, not the array's "
         "data, and it loads only while that pool lives. To keep the data, pickle or store a "
         "copy (x.copy()), or save it with np.save.";
}

std::optional<Block> Pool::attach_block(const Handle& hd, uint64_t lo, uint64_t hi, Mode mode) {
  // The token alone is not enough: a new pool under an old token hands out
  // the same blocks with the same generations (handle.hpp).
  if (!(hd.pool == id_) || !(hd.instance == instance()))
    throw CoreError(ErrorKind::kStaleHandle, foreign_handle_message(hd.pool == id_));
  Guard g(*this, mode);
  if (!g.held()) {
    // In kFast a handle of a segment this process has not mapped yet lands
    // here too; kSlow maps it.
    return std::nullopt;
  }
  BlockHeader* h = checked_header(hd.ref, hd.generation);
  if (hi > h->capacity() || lo > hi)
    throw CoreError(ErrorKind::kInvalidHandle,
                    "handle describes bytes [" + std::to_string(lo) + ", " + std::to_string(hi) +
                        ") outside its block of " + std::to_string(h->capacity()) + " bytes");
  // A private handle (auto mode) loads once: its block's one pending count
  // is gone once it has loaded (or expired), and a second load would share
  // memory that the first receiver owns alone.
  if (((hd.flags & kHandleFlagPrivate) != 0) != ((h->flags & kFlagPrivate) != 0))
    throw CoreError(ErrorKind::kInvalidHandle,
                    (hd.flags & kHandleFlagPrivate)
                        ? "a private handle names a block that is not an auto-mode copy"
                        : "an auto-mode copy can only be loaded by its own private handle");
  if ((hd.flags & kHandleFlagPrivate) && h->pending == 0)
    throw CoreError(ErrorKind::kStaleHandle,
                    "this pickle is a private copy sent by auto mode and loads once: it has "
                    "been loaded already, or it expired unloaded (transfer_timeout)");
  if (!holds_.find(hd.ref.bits())) {
    // Held once per process, however many arrays it has on the block.
    if (!reserve_hold_locked(mode)) return std::nullopt;
    // A kSlow reservation may have grown the pool: look again.
    h = checked_header(hd.ref, hd.generation);
    add_hold_locked(hd.ref, hd.generation, *h, /*counted=*/false);
  }
  if ((hd.flags & kHandleFlagTransferRequired) && h->pending > 0) {
    Counters& c = hdr_->counters;
    --h->pending;
    --c.pending_transfers;
    if (h->pending == 0) --c.pending_blocks;
  }
  return Block{hd.ref, hd.generation, h->payload(), h->capacity(), h->flags & kFlagBits};
}

}  // namespace pap
