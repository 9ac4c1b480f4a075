#include "core/pool.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/errors.hpp"
#include "core/pool_snapshot.hpp"

namespace pap {

constexpr uint64_t kMagic = 0x31304C4F4F505041ull;  // "APPOOL01"
constexpr uint32_t kLayoutVersion = 4;              // 2: instance_id, 3: root, 4: root_left
constexpr uint32_t kStateRunning = 0;
constexpr uint32_t kStateDead = 1;  // being removed by its last process or a cleaner

struct Counters {
  uint64_t capacity_bytes;
  uint64_t used_bytes;
  uint64_t live_blocks;
  uint64_t pending_transfers;
  uint64_t pending_blocks;
  uint64_t next_generation;
  // No pending count expires before this time: maintenance skips its walk
  // until then unless a process died. Only ever moved earlier between walks.
  uint64_t next_expiry_ns;
};

// The control segment. Fields above `lock` are written once by the creator
// before `magic` is published; `state`, the process table and the segment
// table are read without the lock and are atomics; everything from `alloc`
// down is read and written only under the lock.
struct ControlHeader {
  std::atomic<uint64_t> magic;
  uint32_t layout_version;
  uint32_t control_bytes;
  PoolId pool_id;
  uint64_t created_realtime_ns;
  // Random, drawn by the creator: tells apart two pools that share a token
  // (the same name in two /dev/shm mounts, or one recreated after its
  // program ended), which the token alone cannot.
  unsigned char instance_id[16];
  ProgramRoot root;
  // Set by the root when it leaves: from then on it will not load anything,
  // and nobody keeps the pool for it (it may still run for a while, in its
  // own exit handlers).
  std::atomic<uint32_t> root_left;
  PoolConfig config;
  std::atomic<uint32_t> state;
  // Set by a waiter that took the lock from a dead owner, cleared once the
  // repair is complete: a repair cut short (an error, another death) is
  // redone by the next owner.
  std::atomic<uint32_t> needs_repair;
  alignas(64) LockWord lock;
  alignas(64) ProcessTable table;
  std::atomic<uint32_t> segment_count;
  // Size of each data segment; 0 once retired (see retire_free_segments_locked).
  std::atomic<uint64_t> segment_sizes[BlockRef::kMaxSegments];
  // The random part of each data segment's name (see data_name).
  std::atomic<uint64_t> segment_nonces[BlockRef::kMaxSegments];
  // Bumped at each retirement, so processes notice they must unmap.
  std::atomic<uint64_t> retired_epoch;
  alignas(64) AllocState alloc;
  Counters counters;
};

static_assert(std::atomic<uint64_t>::is_always_lock_free);

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kControlBytes = (sizeof(ControlHeader) + kPage - 1) & ~(kPage - 1);
constexpr uint64_t kLargeRound = 2u << 20;

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// The program's root process (see ProgramRoot) is still running: same pid,
// same start time, not a zombie.
bool is_me(const ProgramRoot& root) {
  return root.pid == ::getpid() && root.start_time == process_start_time(::getpid());
}

bool root_alive(const ProgramRoot& root) {
  if (root.pid <= 0) return false;
  bool zombie = false;
  uint64_t started = process_start_time(static_cast<pid_t>(root.pid), &zombie);
  return started != 0 && !zombie && started == root.start_time;
}

uint64_t realtime_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// "/dev/shm has 12.0 MiB (12582912 bytes) free of 64.0 MiB"
std::string shm_space() {
  struct statvfs v;
  if (::statvfs("/dev/shm", &v) != 0) return "/dev/shm free space unknown";
  const uint64_t free_bytes = static_cast<uint64_t>(v.f_bavail) * v.f_frsize;
  const uint64_t total = static_cast<uint64_t>(v.f_blocks) * v.f_frsize;
  return "/dev/shm has " + human_bytes(free_bytes) + " (" + std::to_string(free_bytes) +
         " bytes) free of " + human_bytes(total);
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// Waits for a creator to publish the header; false if it never does.
bool wait_initialized(const ControlHeader* h, int ms) {
  for (int i = 0; i < ms; ++i) {
    if (h->magic.load(std::memory_order_acquire) == kMagic) return true;
    sleep_ms(1);
  }
  return h->magic.load(std::memory_order_acquire) == kMagic;
}

class TableProbe : public OwnerProbe {
 public:
  explicit TableProbe(const ProcessTable& t) : t_(t) {}
  bool owner_alive(uint32_t owner) override {
    return owner == 0 || owner > kMaxSlots || t_.alive(owner - 1, monotonic_ns());
  }

 private:
  const ProcessTable& t_;
};

// Everything of the pool in /dev/shm: data segments, orphans of a process
// killed while growing, the control segment last (it stays the pool's index
// until the end, so that a remover killed halfway leaves a pool that the
// next attacher or cleaner finds and finishes removing). Best effort: this runs at
// exit and must not fail halfway over a file that is not ours.
void unlink_data_files(const std::string& token) {
  unlink_all_quietly(std::string(kShmPrefix) + token + "-");
  unlink_all_quietly(std::string(kShmPrefix) + token + ".init");
}

void unlink_pool_files(const std::string& token) {
  unlink_data_files(token);
  ::shm_unlink(control_name(token).c_str());
}

}  // namespace

// Holds the pool lock for a scope. In kFast it only tries once and also
// gives up if this process has not mapped every published segment (mapping
// is a system call); check held() before using the pool.
class Pool::Guard {
 public:
  // Only the lock, taken over from a dead owner if need be: no mapping and
  // no repair, for a pool that may be half removed (settle_stuck_dead).
  struct LockOnly {};
  Guard(Pool& p, LockOnly) : p_(p) {
    TableProbe probe(p.hdr_->table);
    if (futex_lock::lock(p.hdr_->lock, p.slot_ + 1, probe) == Acquired::kFromDeadOwner)
      p.hdr_->needs_repair.store(1, std::memory_order_relaxed);  // by the next full Guard
    held_ = true;
  }
  Guard(Pool& p, Mode mode) : p_(p) {
    if (p.left_)
      throw CoreError(ErrorKind::kPool, "this process is no longer attached to the pool");
    const uint32_t me = p.slot_ + 1;
    if (mode == Mode::kFast) {
      if (!p.all_mapped() || !futex_lock::try_lock(p.hdr_->lock, me)) return;
      held_ = true;
      // A segment was published or retired meanwhile: (un)mapping is a
      // system call, for kSlow.
      if (!p.all_mapped() || !p.retirements_seen() ||
          p.hdr_->needs_repair.load(std::memory_order_relaxed))
        release();
      return;
    }
    p.ensure_mapped();
    TableProbe probe(p.hdr_->table);
    Acquired how = futex_lock::lock(p.hdr_->lock, me, probe);
    held_ = true;
    if (how == Acquired::kFromDeadOwner) p.hdr_->needs_repair.store(1, std::memory_order_relaxed);
    try {
      p.ensure_mapped();
      p.unmap_retired();
      if (p.hdr_->needs_repair.load(std::memory_order_relaxed)) {
        // The owner may have died in leave() between marking the pool dead
        // and finding us alive: we are, so the pool runs on.
        p.hdr_->state.store(kStateRunning, std::memory_order_seq_cst);
        p.maintain_locked(true, HolderMask{});
        p.hdr_->needs_repair.store(0, std::memory_order_relaxed);
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~Guard() { release(); }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;
  bool held() const { return held_; }
  void release() {
    if (held_) futex_lock::unlock(p_.hdr_->lock);
    held_ = false;
  }

 private:
  Pool& p_;
  bool held_ = false;
};

Pool::Pool(std::string token, Mapping control)
    : token_(std::move(token)),
      id_(PoolId::from_token(token_)),
      control_(std::move(control)),
      hdr_(reinterpret_cast<ControlHeader*>(control_.data())),
      pid_(::getpid()),
      mappings_(new Mapping[BlockRef::kMaxSegments]) {}

Pool::~Pool() = default;

AllocState& Pool::alloc_state() { return hdr_->alloc; }
ProcessTable& Pool::table() { return hdr_->table; }
PoolConfig Pool::config() const { return hdr_->config; }
std::string Pool::instance_id() const {
  return to_hex(hdr_->instance_id, sizeof hdr_->instance_id);
}

bool Pool::all_mapped() const {
  return mapped_.load(std::memory_order_acquire) ==
         hdr_->segment_count.load(std::memory_order_acquire);
}

void Pool::ensure_mapped() {
  if (all_mapped()) return;
  std::lock_guard<std::mutex> local(local_mutex_);
  uint32_t published = hdr_->segment_count.load(std::memory_order_acquire);
  for (uint32_t i = mapped_.load(std::memory_order_relaxed); i < published; ++i) {
    uint64_t size = hdr_->segment_sizes[i].load(std::memory_order_acquire);
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
  uint32_t nsegs = hdr_->segment_count.load(std::memory_order_acquire);
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

void Pool::claim_slot_or_throw() {
  const uint64_t id = slot_id(::getpid(), my_kind());
  ProcessTable::SlotFields mine;
  mine.start_time = process_start_time(::getpid());
  int s = table().claim(id, mine);
  if (s >= 0) {
    slot_ = static_cast<uint32_t>(s);
    return;
  }
  // An observer takes only a free slot: taking a dead one over means
  // reclaiming its blocks, which is the pool's own processes' to do.
  if (observer_)
    throw CoreError(ErrorKind::kPool, "no free slot to look at the pool (limit " +
                                          std::to_string(kMaxSlots) + " processes)");
  // Every slot is taken: take one whose owner is dead and clear its bits
  // before holding anything. Never the lock owner's slot: a waiter must
  // still see that owner as dead to repair after it.
  uint32_t owner = futex_lock::owner_of(hdr_->lock.load(std::memory_order_relaxed));
  uint64_t now = monotonic_ns();
  uint64_t dead_owner = 0;
  for (uint32_t i = 0; i < kMaxSlots && s < 0; ++i) {
    uint64_t old = table().slots[i].id.load(std::memory_order_acquire);
    if (old == 0 || old == kReleasingId || i + 1 == owner || table().alive(i, now)) continue;
    if (table().take(i, old, id, mine)) {
      s = static_cast<int>(i);
      dead_owner = old;
    }
  }
  if (s < 0)
    throw CoreError(ErrorKind::kPool, "too many processes attached to the pool (limit " +
                                          std::to_string(kMaxSlots) + ")");
  slot_ = static_cast<uint32_t>(s);
  HolderMask inherited{};
  inherited.set(slot_);
  Guard g(*this, Mode::kSlow);
  maintain_locked(true, inherited, dead_owner);  // clears the dead owner's bits, now ours
}

std::unique_ptr<Pool> Pool::attach(const std::string& token, const PoolConfig& config,
                                   ProgramRoot root) {
  if (!valid_token(token)) throw CoreError(ErrorKind::kPool, "invalid pool token '" + token + "'");
  if (config.segment_bytes == 0 || config.max_bytes == 0)
    throw CoreError(ErrorKind::kPool, "max_bytes and segment_bytes must be positive");
  bool swept = false;
  for (int attempt = 0; attempt < 2000; ++attempt) {
    if (auto p = attach_existing(token)) return p;
    if (!swept) {
      // Start-up is when leftovers of dead programs are removed.
      clean_stale(false, token);
      swept = true;
    }
    // Build the control segment under a private name and publish it with
    // link(), which fails if another process won the race: nobody ever
    // opens a half-initialized pool.
    const std::string final_name = control_name(token);
    // Random, not the pid: two threads of one process may race here.
    const std::string tmp_name = final_name + ".init" + random_token().substr(0, 12);
    unlink_segment(tmp_name);
    Mapping m;
    if (create_segment(tmp_name, kControlBytes, &m) == CreateResult::kExists) continue;
    auto* h = reinterpret_cast<ControlHeader*>(m.data());
    // The file is zero-filled: only non-zero fields need writing.
    h->layout_version = kLayoutVersion;
    h->control_bytes = static_cast<uint32_t>(kControlBytes);
    h->pool_id = PoolId::from_token(token);
    h->created_realtime_ns = realtime_ns();
    fill_random(h->instance_id, sizeof h->instance_id);
    if (root.pid > 0 && root.start_time != 0) h->root = root;
    h->config = config;
    h->state.store(kStateRunning);
    h->segment_count.store(0);
    Allocator(h->alloc, nullptr).reset();
    h->counters = Counters{};
    h->counters.next_generation = 1;
    h->magic.store(kMagic, std::memory_order_release);
    // Claim our slot before the pool becomes visible: a cleaner must never
    // see a published pool without a live process.
    ProcessTable::SlotFields mine;
    mine.start_time = process_start_time(::getpid());
    const int first_slot = h->table.claim(slot_id(::getpid(), SlotKind::kActive), mine);
    int linked = ::link(("/dev/shm" + tmp_name).c_str(), ("/dev/shm" + final_name).c_str());
    int link_errno = errno;
    unlink_segment(tmp_name);
    if (linked != 0) {
      if (link_errno == EEXIST) continue;
      throw_os_error("link " + final_name, link_errno);
    }
    std::unique_ptr<Pool> p(new Pool(token, std::move(m)));
    p->slot_ = static_cast<uint32_t>(first_slot);
    return p;
  }
  throw CoreError(ErrorKind::kPool, "could not attach to pool " + token);
}

std::unique_ptr<Pool> Pool::attach_existing(const std::string& token) {
  return attach_existing_as(token, false);
}

std::unique_ptr<Pool> Pool::attach_observer(const std::string& token) {
  return attach_existing_as(token, true);
}

std::unique_ptr<Pool> Pool::attach_existing_as(const std::string& token, bool observer) {
  // A leaver or cleaner marks the pool dead and removes it within
  // microseconds, or (a leaver) puts it back to running under the lock. A
  // pool still marked dead after this many 1 ms waits, and still linked
  // under its name, was left so by a process killed in between (a pool
  // worker SIGTERMed in its exit): we settle it instead of waiting forever.
  constexpr int kStuckDead = 500;
  int dead_seen = 0;
  for (int attempt = 0; attempt < 2000; ++attempt) {
    Mapping m;
    if (!open_segment(control_name(token), kControlBytes, 0, &m)) {
      return nullptr;
    }
    auto* h = reinterpret_cast<ControlHeader*>(m.data());
    if (!wait_initialized(h, 2000)) {
      // The creator died between creating and publishing the header.
      unlink_segment(control_name(token));
      continue;
    }
    if (h->layout_version != kLayoutVersion)
      throw CoreError(ErrorKind::kPool, "pool " + token + " has an incompatible layout");
    if (h->state.load() == kStateDead && ++dead_seen < kStuckDead) {
      sleep_ms(1);  // its last process is removing it; it will be gone soon
      continue;
    }
    std::unique_ptr<Pool> p(new Pool(token, std::move(m)));
    p->observer_ = observer;
    p->claim_slot_or_throw();
    // Pairs with leave(): the leaver marks the pool dead, then looks for
    // live slots; we claimed a slot, then look at the state. One of the two
    // sees the other.
    if (h->state.load(std::memory_order_seq_cst) == kStateDead) {
      const StuckDead settled =
          dead_seen >= kStuckDead ? p->settle_stuck_dead() : StuckDead::kRetry;
      if (settled == StuckDead::kRevived) return p;
      p->table().release(p->slot_);
      p->left_ = true;
      if (settled == StuckDead::kRemoved) return nullptr;
      sleep_ms(1);
      continue;
    }
    return p;
  }
  throw CoreError(ErrorKind::kPool, "could not attach to pool " + token);
}

Pool::StuckDead Pool::settle_stuck_dead() {
  Guard g(*this, Guard::LockOnly{});
  if (hdr_->state.load(std::memory_order_seq_cst) != kStateDead) return StuckDead::kRevived;
  // Still the pool linked under our token (not removed and made anew)?
  Mapping again;
  if (!open_segment(control_name(token_), kControlBytes, 0, &again)) return StuckDead::kRetry;
  const auto* h = reinterpret_cast<const ControlHeader*>(again.data());
  if (std::memcmp(h->instance_id, hdr_->instance_id, sizeof h->instance_id) != 0)
    return StuckDead::kRetry;
  // Whoever marked it dead was killed before it finished. Nobody could
  // attach since, so if nobody needs the pool now, nobody did then: it was
  // the last to leave (maybe halfway through unlinking the files, which is
  // why this takes only the lock and maps nothing), and we finish for it.
  // Otherwise it was killed inside the lock, before it found the others.
  if (nobody_needs_pool_locked(/*leaver_is_root=*/false)) {
    unlink_pool_files(token_);
    return StuckDead::kRemoved;
  }
  hdr_->state.store(kStateRunning, std::memory_order_seq_cst);
  return StuckDead::kRevived;
}

std::optional<Block> Pool::allocate(uint64_t bytes, bool transfer_required, Mode mode) {
  uint64_t block_size = Allocator::block_size_for(bytes);
  if (block_size == 0)
    throw CoreError(ErrorKind::kPoolFull, "pyarraypool cannot allocate " + std::to_string(bytes) +
                                              " bytes: larger than any block can be");
  // No cache while a fork is under way: the child must hold every block.
  if (mode == Mode::kFast && cache_.bytes() != 0 && child_slot_.load(std::memory_order_relaxed) < 0)
    if (auto b = cache_.take(bytes, transfer_required ? kFlagTransferRequired : 0u)) return b;
  Guard g(*this, mode);
  if (!g.held()) return std::nullopt;
  if (auto b = allocate_locked(block_size, transfer_required)) return b;
  if (mode == Mode::kFast) return std::nullopt;
  // Out of room: first take back what dead processes and expired pickles
  // hold, then grow by a segment.
  if (maintain_locked(false, HolderMask{}) > 0)
    if (auto b = allocate_locked(block_size, transfer_required)) return b;
  grow_locked(block_size, bytes);
  if (auto b = allocate_locked(block_size, transfer_required)) return b;
  throw_full(bytes);
}

std::optional<Block> Pool::allocate_locked(uint64_t block_size, bool transfer_required) {
  Counters& c = hdr_->counters;
  UsedInit init{c.next_generation, slot_, transfer_required ? kFlagTransferRequired : 0u};
  Allocator a = allocator();
  BlockRef ref = a.allocate(block_size, init);
  if (ref.nil()) return std::nullopt;
  ++c.next_generation;
  BlockHeader* h = a.header(ref);
  // Another thread is forking: the child inherits this block's arrays too.
  if (int child = child_slot_.load(std::memory_order_relaxed); child >= 0)
    h->holders.set(static_cast<uint32_t>(child));
  c.used_bytes += h->size();
  ++c.live_blocks;
  return Block{ref, init.generation, h->payload(), h->capacity(), init.flags};
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
  uint32_t index = hdr_->segment_count.load(std::memory_order_relaxed);
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
  const PoolConfig cfg = hdr_->config;
  throw CoreError(
      ErrorKind::kPoolFull,
      "pyarraypool cannot allocate " + std::to_string(bytes) + " bytes: the pool uses " +
          std::to_string(c.used_bytes) + " (" + human_bytes(c.used_bytes) +
          ") of max_bytes=" + std::to_string(cfg.max_bytes) + " (" + human_bytes(cfg.max_bytes) +
          ") in " + std::to_string(c.live_blocks) + " live blocks; capacity " +
          std::to_string(c.capacity_bytes) + " bytes, largest free block " +
          std::to_string(allocator().largest_free()) + " bytes; " + usage_locked() + "; " +
          shm_space() +
          ". Raise max_bytes with pyarraypool.configure(max_bytes=...) or PYARRAYPOOL_MAX_BYTES"
          " (before the program first uses the pool), or drop arrays and load pending pickles");
}

BlockHeader* Pool::checked_header(BlockRef ref, uint64_t generation) {
  if (ref.seg() >= mapped_.load(std::memory_order_acquire))
    throw CoreError(ErrorKind::kStaleHandle, "handle names a segment this pool does not have");
  const SegmentSpan& s = spans_[ref.seg()];
  if (s.size == 0)
    throw CoreError(ErrorKind::kStaleHandle, "handle names a segment the pool has given back");
  if (ref.off() % kAlign != 0 || ref.off() + kHeaderSize > s.size)
    throw CoreError(ErrorKind::kInvalidHandle, "handle points outside its segment");
  BlockHeader* h = allocator().header(ref);
  if (!h->used() || h->generation != generation ||
      h->check != header_check(ref.off(), generation) || h->size() > s.size - ref.off())
    throw CoreError(ErrorKind::kStaleHandle,
                    "the block this handle names has been freed (generation " +
                        std::to_string(generation) + ")");
  return h;
}

void Pool::free_if_unused(BlockRef ref, BlockHeader& h) {
  if (h.holders.any() || h.pending > 0) return;
  Counters& c = hdr_->counters;
  c.used_bytes -= h.size();
  --c.live_blocks;
  allocator().free(ref);
}

bool Pool::release_unshared(const Block& b, Mode mode) {
  if (mode == Mode::kFast && child_slot_.load(std::memory_order_relaxed) < 0 && cache_.put(b))
    return true;
  return release(b.ref, b.generation, mode);
}

void Pool::drain_cache_locked() {
  cache_.drain([&](const Block& b) {
    BlockHeader* h = checked_header(b.ref, b.generation);
    h->holders.clear(slot_);
    free_if_unused(b.ref, *h);
  });
}

bool Pool::release(BlockRef ref, uint64_t generation, Mode mode) {
  Guard g(*this, mode);
  if (!g.held()) return false;
  BlockHeader* h = checked_header(ref, generation);
  h->holders.clear(slot_);
  free_if_unused(ref, *h);
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

std::optional<Block> Pool::attach_block(const Handle& hd, uint64_t lo, uint64_t hi, Mode mode) {
  if (!(hd.pool == id_)) throw CoreError(ErrorKind::kStaleHandle, "handle belongs to another pool");
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
  h->holders.set(slot_);
  if (int child = child_slot_.load(std::memory_order_relaxed); child >= 0)
    h->holders.set(static_cast<uint32_t>(child));  // a fork is under way
  if ((hd.flags & kHandleFlagTransferRequired) && h->pending > 0) {
    Counters& c = hdr_->counters;
    --h->pending;
    --c.pending_transfers;
    if (h->pending == 0) --c.pending_blocks;
  }
  return Block{hd.ref, hd.generation, h->payload(), h->capacity(), h->flags & kFlagBits};
}

uint32_t Pool::live_processes_locked(uint64_t now, std::vector<int>* pids, bool count_me) {
  uint32_t n = 0;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t id = table().slots[i].id.load(std::memory_order_seq_cst);
    if (id == 0 || is_observer(id)) continue;
    if (i == slot_ && !count_me) continue;
    if (i != slot_ && !table().alive(i, now)) continue;
    ++n;
    if (pids && slot_kind(id) == SlotKind::kActive) pids->push_back(slot_pid(id));
  }
  return n;
}

namespace {

// What one maintenance walk takes back, gathered for its PoolEvents: per
// dead slot, and per sender of expired pickles. Fixed-size: the walk runs
// inside the allocator's rebuild, where nothing may throw.
struct ReclaimTally {
  static constexpr int kSenders = 8;
  uint64_t timeout_ns;
  HolderMask reported{};             // dead slots whose reclaim is reported
  uint64_t ids[kMaxSlots] = {};      // their owners' ids
  PoolEvent held[kMaxSlots] = {};    // per dead slot
  PoolEvent expired[kSenders] = {};  // per sender; the last one merges the rest
  int senders = 0;

  // Counts block `h` (before its dead holders are cleared); returns the
  // event its freeing would be credited to.
  PoolEvent* reclaim(const BlockHeader& h, uint64_t size) {
    PoolEvent* first = nullptr;
    for (uint32_t w = 0; w < kMaxSlots / 64; ++w)
      for (uint64_t bits = h.holders.words[w] & reported.words[w]; bits; bits &= bits - 1) {
        PoolEvent& e = held[w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits))];
        ++e.blocks;
        e.bytes += size;
        if (!first) first = &e;
      }
    return first;
  }
  PoolEvent* expire(const BlockHeader& h, uint64_t size, uint64_t now) {
    const int pid = sender_of(h.flags);
    PoolEvent* e = nullptr;
    for (int i = 0; i < senders && !e; ++i)
      if (expired[i].pid == pid) e = &expired[i];
    if (!e && senders < kSenders) {
      e = &expired[senders++];
      e->pid = pid;
    }
    if (!e) {
      e = &expired[kSenders - 1];
      e->pid = 0;  // merged: several senders
    }
    ++e->blocks;
    e->bytes += size;
    e->pickles += h.pending;
    const uint64_t made =
        h.pending_deadline_ns > timeout_ns ? h.pending_deadline_ns - timeout_ns : 0;
    e->age_ns = std::max(e->age_ns, now > made ? now - made : 0);
    return e;
  }
  void report(EventLog& log) {
    for (uint32_t i = 0; i < kMaxSlots; ++i) {
      if (!reported.test(i) || held[i].blocks == 0) continue;
      held[i].kind = PoolEvent::Kind::kReclaim;
      held[i].pid = slot_pid(ids[i]);
      held[i].reserved = slot_kind(ids[i]) == SlotKind::kReserved;
      log.push(held[i]);
    }
    for (int i = 0; i < senders; ++i) {
      expired[i].kind = PoolEvent::Kind::kExpiry;
      expired[i].timeout_ns = timeout_ns;
      log.push(expired[i]);
    }
  }
};

}  // namespace

uint64_t Pool::maintain_locked(bool force_rebuild, const HolderMask& also_dead,
                               uint64_t also_dead_id) {
  const uint64_t now = monotonic_ns();
  HolderMask dead = also_dead;
  uint64_t dead_ids[kMaxSlots] = {};  // the id each slot had when judged dead
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (i == slot_ || id == 0 || also_dead.test(i)) continue;
    if (!table().alive(i, now)) {
      dead.set(i);
      dead_ids[i] = id;
    }
  }
  Counters& c = hdr_->counters;
  if (!force_rebuild && !dead.any() && (c.pending_blocks == 0 || now < c.next_expiry_ns)) return 0;

  // Heap, not stack: it is a few KiB and maintenance is rare.
  auto tally = std::make_unique<ReclaimTally>();
  tally->timeout_ns = hdr_->config.transfer_timeout_ns;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = dead_ids[i] ? dead_ids[i] : also_dead.test(i) ? also_dead_id : 0;
    if (id == 0 || id == kReleasingId) continue;
    tally->reported.set(i);
    tally->ids[i] = id;
  }
  const uint64_t used_before = c.used_bytes;
  Counters fresh{};
  fresh.next_generation = c.next_generation;
  fresh.next_expiry_ns = ~uint64_t{0};
  auto keep = [&](BlockRef, BlockHeader& h) {
    const uint64_t size = h.size();
    PoolEvent* credit = tally->reclaim(h, size);
    h.holders.clear_all(dead);
    if (h.pending > 0 && now >= h.pending_deadline_ns) {
      credit = tally->expire(h, size, now);
      h.pending = 0;
    }
    if (!h.holders.any() && h.pending == 0) {
      if (credit) credit->freed_bytes += size;
      return false;
    }
    fresh.used_bytes += h.size();
    ++fresh.live_blocks;
    fresh.pending_transfers += h.pending;
    if (h.pending > 0) {
      ++fresh.pending_blocks;
      fresh.next_expiry_ns = std::min(fresh.next_expiry_ns, h.pending_deadline_ns);
    }
    return true;
  };
  uint32_t nsegs = hdr_->segment_count.load(std::memory_order_acquire);
  // The walk trusts the shared sizes, not this process's spans: a segment
  // retired by a process that died before bumping anything is skipped too.
  for (uint32_t i = 0; i < nsegs; ++i)
    if (hdr_->segment_sizes[i].load(std::memory_order_acquire) == 0) spans_[i].size = 0;
  allocator().rebuild(nsegs, keep);
  for (uint32_t i = 0; i < nsegs; ++i)
    fresh.capacity_bytes += hdr_->segment_sizes[i].load(std::memory_order_relaxed);
  c = fresh;
  for (uint32_t i = 0; i < kMaxSlots; ++i)
    if (dead_ids[i] != 0) table().release_if(i, dead_ids[i]);
  tally->report(events_);
  return used_before > c.used_bytes ? used_before - c.used_bytes : 0;
}

uint64_t Pool::collect() {
  Guard g(*this, Mode::kSlow);
  const uint64_t used_before = hdr_->counters.used_bytes;
  drain_cache_locked();
  const uint64_t cached = used_before - hdr_->counters.used_bytes;
  return observer_ ? cached : cached + maintain_locked(false, HolderMask{});
}

PoolStats Pool::stats() {
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();  // this process's accounting is exact
  if (!observer_) maintain_locked(false, HolderMask{});
  PoolStats s;
  stats_locked(&s);
  return s;
}

PoolSnapshot Pool::snapshot() {
  Guard g(*this, Mode::kSlow);
  drain_cache_locked();
  if (!observer_) maintain_locked(false, HolderMask{});
  PoolSnapshot s;
  snapshot_locked(&s);
  return s;
}

void Pool::snapshot_locked(PoolSnapshot* s) {
  stats_locked(&s->stats);
  s->instance = instance_id();
  s->created_realtime_ns = hdr_->created_realtime_ns;
  SnapshotBuilder b(monotonic_ns(), hdr_->config.transfer_timeout_ns);
  Allocator a = allocator();
  const uint32_t nsegs = hdr_->segment_count.load(std::memory_order_acquire);
  for (uint32_t seg = 0; seg < nsegs && seg < mapped_.load(std::memory_order_acquire); ++seg)
    if (spans_[seg].size != 0)
      a.for_each_block(seg, [&](BlockRef, const BlockHeader& h) { b.add_block(h); });
  // Live slots only: maintenance has just freed the dead ones' (stats_locked
  // has the same view in `pids`).
  const uint64_t now = monotonic_ns();
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t id = table().slots[i].id.load(std::memory_order_acquire);
    if (id != 0 && !is_observer(id) && (i == slot_ || table().alive(i, now))) b.add_slot(i, id);
  }
  b.finish(s);
}

void Pool::stats_locked(PoolStats* out) {
  PoolStats& s = *out;
  s.token = token_;
  const Counters& c = hdr_->counters;
  s.capacity_bytes = c.capacity_bytes;
  s.used_bytes = c.used_bytes;
  s.live_blocks = c.live_blocks;
  s.pending_transfers = c.pending_transfers;
  s.pending_blocks = c.pending_blocks;
  s.segments = hdr_->segment_count.load();
  s.config = hdr_->config;
  s.processes = live_processes_locked(monotonic_ns(), &s.pids);
  s.free_bytes = c.capacity_bytes - c.used_bytes;
  s.largest_free_block = allocator().largest_free();
}

bool Pool::nobody_needs_pool_locked(bool leaver_is_root) {
  if (live_processes_locked(monotonic_ns(), nullptr, /*count_me=*/false) != 0) return false;
  // Pickles in flight with nobody attached: their receiver may be the
  // program's root, which attaches on first use. Keep the pool for it;
  // its own exit (or a cleaner, once it is gone) removes the pool.
  return !(hdr_->counters.pending_transfers > 0 && !leaver_is_root &&
           hdr_->root_left.load(std::memory_order_seq_cst) == 0 && root_alive(hdr_->root));
}

void Pool::leave(bool unlink_if_last) { leave_impl(unlink_if_last, LeaveStep::kNone); }

void Pool::die_while_leaving(LeaveStep at) {
  leave_impl(true, at);
  for (;;) ::pause();  // `at` was not reached: the caller's test fails on the exit status
}

void Pool::leave_impl(bool unlink_if_last, LeaveStep die_at) {
  auto step = [die_at](LeaveStep s) {
    if (s == die_at) ::kill(::getpid(), SIGKILL);
  };
  if (left_) return;
  bool last = false;
  {
    Guard g(*this, Mode::kSlow);
    HolderMask me{};
    me.set(slot_);
    cache_.forget();  // the walk below drops our holds on cached blocks too
    if (!observer_) maintain_locked(true, me);  // an observer holds nothing
    left_ = true;
    const bool root = is_me(hdr_->root);
    if (root) hdr_->root_left.store(1, std::memory_order_seq_cst);
    if (unlink_if_last) {
      // See attach_existing() for the other half of this handshake, and
      // settle_stuck_dead() for what follows if we are killed from here on.
      hdr_->state.store(kStateDead, std::memory_order_seq_cst);
      step(LeaveStep::kMarkedDead);
      last = nobody_needs_pool_locked(root);
      if (!last) hdr_->state.store(kStateRunning, std::memory_order_seq_cst);
    }
  }
  step(LeaveStep::kUnlocked);
  // Our slot is freed only after the lock is released: killed while holding
  // the lock, we must still be found dead by the lock's waiters, never
  // replaced in our slot by a live newcomer that they would wait for.
  table().release_if(slot_, slot_id(::getpid(), my_kind()));
  if (last) {
    unlink_data_files(token_);
    step(LeaveStep::kDataUnlinked);
    ::shm_unlink(control_name(token_).c_str());
  }
}

void Pool::before_fork(const std::vector<std::pair<BlockRef, uint64_t>>& held) {
  Guard g(*this, Mode::kSlow);
  local_mutex_.lock();  // released by after_fork_*: no thread may be mid-append at fork
  fork_prepared_ = true;
  child_slot_id_ = slot_id(::getpid(), SlotKind::kReserved);
  ProcessTable::SlotFields reservation;
  reservation.reserved_at_ns = monotonic_ns();
  reservation.reserved_ticks = boot_ticks();
  int reserved = table().claim(child_slot_id_, reservation);
  if (reserved < 0) return;  // too many processes: the child attaches on its own
  child_slot_.store(reserved, std::memory_order_relaxed);
  for (const auto& [ref, gen] : held) {
    BlockHeader* h = allocator().header(ref);
    if (h->used() && h->generation == gen) h->holders.set(static_cast<uint32_t>(reserved));
  }
}

void Pool::after_fork_parent() {
  const int reserved = child_slot_.exchange(-1);
  if (reserved >= 0) {
    // The child now exists (or the fork failed): its reservation lives as
    // long as that child has not adopted it (ProcessTable::alive).
    std::atomic<uint64_t>& t = table().slots[reserved].reserved_ticks;
    t.store(t.load(std::memory_order_relaxed) | kForkReturned, std::memory_order_release);
  }
  if (fork_prepared_) local_mutex_.unlock();
  fork_prepared_ = false;
}

void Pool::after_fork_child() {
  pid_ = ::getpid();
  cache_.forget();  // the parent's blocks, held by the parent
  const int reserved = child_slot_.exchange(-1);
  const bool prepared = fork_prepared_;
  fork_prepared_ = false;
  if (prepared) local_mutex_.unlock();
  ProcessTable::SlotFields mine;
  mine.start_time = process_start_time(::getpid());
  // The reservation names the parent; it may have expired and been freed
  // if this child was stopped for a long time between fork and now.
  if (prepared && reserved >= 0 &&
      table().take(static_cast<uint32_t>(reserved), child_slot_id_,
                   slot_id(::getpid(), SlotKind::kActive), mine)) {
    slot_ = static_cast<uint32_t>(reserved);
    return;
  }
  // No reservation: the parent's slot is not ours to use. Attach afresh
  // (inherited blocks are then unprotected); if even that fails, this
  // process is detached and every operation raises.
  try {
    claim_slot_or_throw();
  } catch (...) {
    left_ = true;
    throw;
  }
}

void Pool::verify() {
  Guard g(*this, Mode::kSlow);
  uint32_t nsegs = hdr_->segment_count.load();
  Allocator a = allocator();
  a.verify(nsegs);
  Counters sum{};
  for (uint32_t seg = 0; seg < nsegs; ++seg) {
    sum.capacity_bytes += spans_[seg].size;
    a.for_each_block(seg, [&](BlockRef, const BlockHeader& h) {
      if (!h.used()) return;
      sum.used_bytes += h.size();
      ++sum.live_blocks;
      sum.pending_transfers += h.pending;
      sum.pending_blocks += h.pending > 0;
      if (!h.holders.any() && h.pending == 0)
        throw CoreError(ErrorKind::kPool, "a used block has no holder and no pending pickle");
    });
  }
  const Counters& c = hdr_->counters;
  if (sum.capacity_bytes != c.capacity_bytes || sum.used_bytes != c.used_bytes ||
      sum.live_blocks != c.live_blocks || sum.pending_transfers != c.pending_transfers ||
      sum.pending_blocks != c.pending_blocks)
    throw CoreError(ErrorKind::kPool, "pool counters disagree with the blocks");
}

void Pool::hold_lock_for(uint64_t ns) {
  Guard g(*this, Mode::kSlow);
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

Pool::BlockInfo Pool::inspect_block(BlockRef ref) {
  Guard g(*this, Mode::kSlow);
  if (ref.seg() >= mapped_.load(std::memory_order_acquire) || spans_[ref.seg()].size == 0 ||
      ref.off() + kHeaderSize > spans_[ref.seg()].size)
    throw CoreError(ErrorKind::kInvalidHandle, "no such block");
  const BlockHeader* h = allocator().header(ref);
  return BlockInfo{h->used(),
                   h->size(),
                   h->generation,
                   h->holders,
                   h->pending,
                   h->flags & kFlagBits,
                   h->check == header_check(ref.off(), h->generation)};
}

void Pool::lock_forever() {
  ensure_mapped();
  TableProbe probe(table());
  futex_lock::lock(hdr_->lock, slot_ + 1, probe);
}

std::vector<std::string> Pool::clean_stale(bool dry_run, const std::string& keep_token) {
  std::vector<std::string> removed;
  const std::string prefix = kShmPrefix;
  std::vector<std::string> names = list_segments(prefix);
  auto token_of = [&](const std::string& n) { return n.substr(prefix.size(), kTokenHexLen); };
  const uint64_t now = monotonic_ns();
  for (const std::string& n : names) {
    if (n.size() != prefix.size() + kTokenHexLen) continue;  // control segments only
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    struct stat st;
    if (::stat(("/dev/shm/" + n).c_str(), &st) != 0 || st.st_uid != ::geteuid()) continue;
    Mapping m;
    try {
      if (!open_segment("/" + n, 0, 0, &m)) continue;
    } catch (const CoreError&) {
      continue;  // not ours to judge (permissions, odd size)
    }
    bool dead;
    if (m.size() < sizeof(ControlHeader)) {
      dead = ::time(nullptr) - st.st_mtime > 10;
    } else {
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      if (h->magic.load(std::memory_order_acquire) != kMagic) {
        dead = ::time(nullptr) - st.st_mtime > 10;
      } else {
        // A pool whose program's root still runs is that program's to
        // remove (leave() may have kept it for the root).
        dead = h->root_left.load() != 0 || !root_alive(h->root);
        for (uint32_t i = 0; i < kMaxSlots && dead; ++i)
          if (uint64_t id = h->table.slots[i].id.load();
              id != 0 && !is_observer(id) && h->table.alive(i, now))
            dead = false;
      }
    }
    if (!dead) continue;
    if (m.size() >= sizeof(ControlHeader) && !dry_run) {
      // The same handshake as leave(): mark it dead, then look again for a
      // process that attached meanwhile.
      auto* h = reinterpret_cast<ControlHeader*>(m.data());
      h->state.store(kStateDead, std::memory_order_seq_cst);
      for (uint32_t i = 0; i < kMaxSlots && dead; ++i)
        if (uint64_t id = h->table.slots[i].id.load(std::memory_order_seq_cst);
            id != 0 && !is_observer(id) && h->table.alive(i, now))
          dead = false;
      if (!dead) {
        h->state.store(kStateRunning, std::memory_order_seq_cst);
        continue;
      }
    }
    for (const std::string& other : names)
      if (other.compare(0, n.size(), n) == 0) {
        removed.push_back(other);
        if (!dry_run) ::shm_unlink(("/" + other).c_str());  // best effort
      }
  }
  // Data segments whose control segment is gone.
  for (const std::string& n : names) {
    if (n.size() <= prefix.size() + kTokenHexLen) continue;
    std::string token = token_of(n);
    if (!valid_token(token) || token == keep_token) continue;
    struct stat st;
    if (::stat(("/dev/shm/" + prefix + token).c_str(), &st) == 0) continue;
    if (::stat(("/dev/shm/" + n).c_str(), &st) != 0 || st.st_uid != ::geteuid()) continue;
    bool listed = false;
    for (const auto& r : removed) listed |= r == n;
    if (listed || ::time(nullptr) - st.st_mtime <= 10) continue;
    removed.push_back(n);
    if (!dry_run) ::shm_unlink(("/" + n).c_str());  // best effort
  }
  return removed;
}

}  // namespace pap
