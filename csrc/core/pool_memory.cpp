// Memory that follows the work: the pages of data segments are reserved
// lazily, just before an allocation first hands them out, and the pages of
// free blocks that stay free for config().decay_ns go back to the kernel
// (docs/design.md, "Memory").
//
// Reserving is posix_fallocate on the segment's file: a full /dev/shm fails
// there, with ENOSPC, before the pool changes anything, never with SIGBUS at
// a first touch. Giving back is fallocate(PUNCH_HOLE | KEEP_SIZE): the pages
// leave the file and every process's page tables at once (each process's
// RssShmem drops with it), and the file keeps its size, so every mapping
// stays valid. Which pages of a free block are reserved is recorded in its
// header (FreeState, block_header.hpp).

#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
#include "core/pool_snapshot.hpp"
#include "core/shm_segment.hpp"

namespace pap {
namespace {

// Punches [lo, hi) out of `fd`'s file. Best effort: a kernel or file
// system without hole punching keeps the pages (and says so with
// EOPNOTSUPP), which costs memory, not correctness.
bool punch(int fd, uint64_t lo, uint64_t hi) {
  int r;
  do {
    r = ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(lo),
                    static_cast<off_t>(hi - lo));
  } while (r != 0 && errno == EINTR);
  return r == 0;
}

uint64_t allocated_bytes(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512u;
}

}  // namespace

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

void Pool::populate_reserved(const Reserved& r) noexcept {
  // Pages just reserved are about to be written by this process (a copy
  // in): mapping them in one call costs a third of taking a fault on each
  // (measured: 64 MiB, 22 ms against 64 ms on 4 KiB shmem pages). Outside
  // the lock. Best effort: kernels before 5.14 say EINVAL, and the copy
  // takes the faults instead.
  if (r.addr && r.len) ::madvise(r.addr, r.len, MADV_POPULATE_WRITE);
}

bool Pool::Reserver::reserve(BlockRef block, uint64_t lo, uint64_t hi) {
  if (mode_ == Mode::kFast) return false;  // a system call: for kSlow
  p_.keep_footprint_locked(block, hi - lo);
  UniqueFd fd = p_.segment_fd(block.seg());
  try {
    try {
      reserve_range(fd.get(), lo, hi - lo);
    } catch (const CoreError& e) {
      // /dev/shm is full, but the pool may hold free pages elsewhere (kept
      // for reuse, not idle long enough to go back): they go back now, and
      // their room serves this block.
      if (e.kind() != ErrorKind::kPoolFull || p_.give_back_locked(block, hi - lo) == 0) throw;
      reserve_range(fd.get(), lo, hi - lo);
    }
  } catch (const CoreError& e) {
    if (e.kind() != ErrorKind::kPoolFull) throw;
    throw CoreError(ErrorKind::kPoolFull,
                    "pyarraypool cannot allocate " + std::to_string(requested_) +
                        " bytes: /dev/shm has no room for them (" + e.what() + "; " + shm_space() +
                        "). The pool holds " + human_bytes(p_.reserved_bytes_locked()) +
                        " of /dev/shm, " + p_.usage_locked() +
                        ". /dev/shm is the limit, not max_bytes: free space there, or make it "
                        "larger (docker run --shm-size=2g, or mount -o remount,size=... /dev/shm)",
                    e.error_number());
  }
  if (populated_) *populated_ = Reserved{p_.spans_[block.seg()].base + lo, hi - lo};
  return true;
}

UniqueFd Pool::segment_fd(uint32_t i) {
  const std::string name = segment_name(i);
  int raw;
  do {
    raw = ::shm_open(name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) throw_os_error("shm_open " + name, errno);
  UniqueFd fd(raw);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw_os_error("fstat " + name, errno);
  check_own_segment(name, st);
  if (static_cast<uint64_t>(st.st_size) != spans_[i].size)
    throw CoreError(ErrorKind::kPool, "segment " + name + " is not the one this process maps");
  return fd;
}

uint64_t Pool::reserved_bytes_locked() {
  uint64_t total = allocated_bytes(ctl_fd_.get());
  const uint32_t n = std::min(published_segments(), mapped_.load(std::memory_order_acquire));
  for (uint32_t i = 0; i < n; ++i) {
    if (spans_[i].size == 0) continue;
    try {
      total += allocated_bytes(segment_fd(i).get());
    } catch (const CoreError&) {
      // Being retired or remade by another process: not counted.
    }
  }
  return total;
}

void Pool::note_freed_locked() {
  const uint64_t due = coarse_now_ms() + hdr_->decay_ns / 1'000'000u;
  const uint64_t now_due = hdr_->decay_due_ms.load(std::memory_order_relaxed);
  if (now_due == 0 || due < now_due) hdr_->decay_due_ms.store(due, std::memory_order_release);
}

uint64_t Pool::return_idle_memory() {
  if (left_) return 0;
  // Read without the lock: nothing due, nothing to do (the common case).
  const uint64_t due = hdr_->decay_due_ms.load(std::memory_order_acquire);
  const uint64_t now = coarse_now_ms();
  if (due == 0 || now < due) return 0;
  uint64_t returned = 0;
  // One piece per lock hold, so that no other process waits long for the
  // lock; a free block of 64 MiB takes 32 holds.
  for (;;) {
    Guard g(*this, Mode::kSlow);
    if (!return_one_piece_locked(now, &returned)) break;
  }
  return returned;
}

bool Pool::return_one_piece_locked(uint64_t now_ms, uint64_t* returned) {
  const uint64_t decay_ms = hdr_->decay_ns / 1'000'000u;
  uint64_t due = now_ms >= decay_ms ? now_ms - decay_ms : 0;
  if (kill_in_return_) due = ~uint64_t{0};  // the test hook: whatever is free
  Allocator a = allocator();
  uint64_t next = 0;
  const BlockRef ref = a.find_idle(due, &next);
  uint64_t lo = 0, hi = 0;
  if (ref.nil() || !a.mark_returned(ref, kReturnChunk, &lo, &hi)) {
    retire_returned_segments_locked();
    hdr_->decay_due_ms.store(next == ~uint64_t{0} ? 0 : next + decay_ms, std::memory_order_release);
    return false;
  }
  punch_locked(ref.seg(), lo, hi, returned);
  return true;
}

void Pool::punch_locked(uint32_t seg, uint64_t lo, uint64_t hi, uint64_t* returned) {
  // The block's record says "returned" before the pages are: a process
  // killed from here on (a test makes one, kill_in_return_) leaves pages
  // that the next allocation reserves again, at worst for nothing.
  if (kill_in_return_) ::kill(::getpid(), SIGKILL);
  UniqueFd fd = segment_fd(seg);
  if (punch(fd.get(), lo, hi)) {
    hdr_->counters.returned_bytes += hi - lo;
    *returned += hi - lo;
  }
}

uint64_t Pool::live_bytes_locked() const {
  const uint64_t used = hdr_->counters.used_bytes, cached = cache_.bytes();
  return used > cached ? used - cached : 0;
}

void Pool::keep_footprint_locked(BlockRef block, uint64_t more) {
  // The bound of issue 12: what /dev/shm holds stays within 1.05x the live
  // bytes + 8 MiB (1 MiB of it left for the control segment and the header
  // pages). Free pages kept for reuse beyond that go back first, whatever
  // their age: growing the reservation past the bound would be worse.
  //
  // "Live" is the most that was live lately (within a decay time), not what
  // is live this instant: a program that keeps a few arrays in flight (a
  // worker makes one while the parent drops another) would otherwise give
  // back, at each new reservation, the free pages it is about to reuse, and
  // reserve them again next time (measured: ProcessPoolExecutor returning
  // 16 MiB arrays took 2.5x longer). The bound still holds against the peak.
  Counters& c = hdr_->counters;
  const uint64_t now = coarse_now_ms();
  const uint64_t window_ms = hdr_->decay_ns / 1'000'000u;
  // A window older than the decay time starts again from what is live now;
  // so does one from the future (a clock it cannot be: a damaged value).
  if (now < c.peak_window_ms || now - c.peak_window_ms > window_ms) {
    c.peak_window_ms = now;
    c.peak_used_bytes = live_bytes_locked();
  }
  const uint64_t live = std::max(c.peak_used_bytes, live_bytes_locked() + more);
  const uint64_t bound = live + live / 20 + (uint64_t{7} << 20);
  const uint64_t held = reserved_bytes_locked();
  if (held + more > bound) give_back_locked(block, held + more - bound);
}

uint64_t Pool::give_back_locked(BlockRef skip, uint64_t bytes) {
  uint64_t returned = 0;
  Allocator a = allocator();
  while (returned < bytes) {
    const BlockRef ref = a.find_idle(~uint64_t{0}, nullptr, skip);
    uint64_t lo, hi;
    if (ref.nil() || !a.mark_returned(ref, bytes - returned, &lo, &hi)) break;
    punch_locked(ref.seg(), lo, hi, &returned);
  }
  return returned;
}

void Pool::retire_returned_segments_locked() {
  Allocator a = allocator();
  const uint32_t nsegs = published_segments();
  for (uint32_t i = 0; i < nsegs; ++i) {
    if (hdr_->segment_sizes[i].load(std::memory_order_relaxed) == 0 || spans_[i].size == 0)
      continue;
    const BlockRef ref(i, 0);
    const BlockHeader* h = a.header(ref);
    const uint64_t size = h->size();
    if (h->used() || size != (spans_[i].size & kSizeMask)) continue;
    const FreeState s = a.free_state(ref, size);
    uint64_t lo, hi;
    Allocator::interior(ref, size, &lo, &hi);
    if (lo < hi && (s.mixed || s.lo != lo || s.hi != hi)) continue;  // pages still reserved
    retire_segment_locked(i);
  }
}

void Pool::retire_segment_locked(uint32_t i) {
  Allocator a = allocator();
  const uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_relaxed);
  a.remove_segment(i);  // before the punch, which zeroes its header
  // Punched before it goes: a retired segment stays mapped by the processes
  // that have not looked since (their RssShmem would keep its pages).
  try {
    UniqueFd fd = segment_fd(i);
    const uint64_t held = allocated_bytes(fd.get());
    if (punch(fd.get(), 0, spans_[i].size)) hdr_->counters.returned_bytes += held;
  } catch (const CoreError&) {
    // Not punched: its pages go when the last process unmaps it.
  }
  // Epoch first: a process killed right after the size store must still
  // leave survivors a reason to look (unmap_retired).
  hdr_->retired_epoch.fetch_add(1, std::memory_order_acq_rel);
  hdr_->segment_sizes[i].store(0, std::memory_order_release);
  hdr_->counters.capacity_bytes -= size;
  unlink_segment(segment_name(i));
  std::lock_guard<std::mutex> local(local_mutex_);
  spans_[i] = SegmentSpan{nullptr, 0};
  mappings_[i] = Mapping();
  span_nonces_[i] = 0;
  seen_retired_epoch_ = hdr_->retired_epoch.load(std::memory_order_acquire);
}

void Pool::return_idle_memory_of(const std::string& token, const std::string& instance) {
  std::unique_ptr<Pool> p = attach_observer(token);
  if (!p) return;
  struct Leave {  // also when giving back fails (a corrupt pool)
    Pool& p;
    ~Leave() {
      try {
        p.leave(false);
      } catch (const CoreError&) {
      }
    }
  } leave{*p};
  if (p->instance_id() == instance) p->return_idle_memory();
}

void Pool::die_while_returning() {
  kill_in_return_ = true;
  hdr_->decay_due_ms.store(1, std::memory_order_release);
  return_idle_memory();
  for (;;) ::pause();  // nothing was due: the caller's test fails on the exit status
}

}  // namespace pap
