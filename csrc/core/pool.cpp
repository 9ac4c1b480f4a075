// A process's membership of a pool: attach (creating the pool if need be),
// leave (the last one removes it), and fork. See pool.hpp for the protocol.

#include "core/pool_internal.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "core/errors.hpp"
#include "core/shm_segment.hpp"

namespace pap {

Pool::Pool(std::string token, Mapping control)
    : token_(std::move(token)),
      id_(PoolId::from_token(token_)),
      control_(std::move(control)),
      hdr_(reinterpret_cast<ControlHeader*>(control_.data())),
      check_key_(hdr_->check_key),
      pid_(::getpid()),
      mappings_(new Mapping[BlockRef::kMaxSegments]) {}

Pool::~Pool() = default;

AllocState& Pool::alloc_state() { return hdr_->alloc; }
ProcessTable& Pool::table() { return hdr_->table; }
PoolConfig Pool::config() const { return hdr_->config; }
std::string Pool::instance_id() const {
  return to_hex(hdr_->instance_id, sizeof hdr_->instance_id);
}
PoolId Pool::instance() const {
  static_assert(sizeof hdr_->instance_id == sizeof(PoolId::bytes));
  PoolId id;
  std::memcpy(id.bytes, hdr_->instance_id, sizeof id.bytes);
  return id;
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
    fill_random(&h->check_key, sizeof h->check_key);
    if (root.pid > 0 && root.start_time != 0) h->root = root;
    h->config = config;
    h->state.store(kStateRunning);
    h->segment_count.store(0);
    Allocator(h->alloc, nullptr, 0, 0).reset();
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
    p->created_ = true;
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
    // A file of ours under this name that holds another pool (a hard link).
    if (!(h->pool_id == PoolId::from_token(token)))
      throw CoreError(ErrorKind::kPool, "/dev/shm" + control_name(token) +
                                            " holds another pool than " + token);
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

}  // namespace pap
