// A process's membership of a pool: attach (creating the pool if need be),
// leave (the last one removes it), and fork. See pool.hpp for the protocol.

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "core/errors.hpp"
#include "core/pool_internal.hpp"
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

PoolConfig Pool::config() const {
  const StoredConfig& c = hdr_->config;
  return PoolConfig{c.max_bytes, c.segment_bytes, c.transfer_timeout_ns, hdr_->decay_ns};
}
std::string Pool::instance_id() const {
  return to_hex(hdr_->instance_id, sizeof hdr_->instance_id);
}
PoolId Pool::instance() const {
  static_assert(sizeof hdr_->instance_id == sizeof(PoolId::bytes));
  PoolId id;
  std::memcpy(id.bytes, hdr_->instance_id, sizeof id.bytes);
  return id;
}

bool Pool::slot_alive(uint32_t slot) const {
  if (slot >= kMaxSlots) return false;
  if (slot == slot_ && !left_) return true;
  const uint64_t id = hdr_->table.slots[slot].id.load(std::memory_order_acquire);
  if (id == 0) return false;
  if (id == kReleasingId) return true;  // being changed right now by a live process
  return liveness::held_by_other(ctl_fd_.get(), slot);
}

std::vector<bool> Pool::liveness_hint() const {
  return liveness::locked_bytes_hint(ctl_fd_.get(), kMaxSlots);
}

bool Pool::slot_alive_hinted(uint32_t slot, const std::vector<bool>& hint) const {
  if (slot < hint.size() && hint[slot] &&
      hdr_->table.slots[slot].id.load(std::memory_order_acquire) != 0)
    return true;
  return slot_alive(slot);
}

void Pool::use_slot_page(int fd, uint32_t slot) {
  // The slot's page of hold entries is reserved before anything is written
  // there. A full /dev/shm does not keep a process out: its list then
  // starts in a block of the pool, whose memory is reserved already.
  uint32_t room = kInlineHolds;
  try {
    if (slot >= kReservedSlotPages) reserve_range(fd, slot_page_offset(slot), kSlotPageBytes);
  } catch (const CoreError& e) {
    if (e.kind() != ErrorKind::kPoolFull) throw;
    room = 0;
  }
  table().slots[slot].inline_capacity.store(room, std::memory_order_release);
  my_list_ = nullptr;  // the room of a slot just claimed: look again
}

int Pool::claim_free_slot(int fd, uint64_t id) {
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    if (table().slots[i].id.load(std::memory_order_relaxed) != 0) continue;
    // The lock first, then the id: a slot whose id is set is always either
    // locked by its owner or dead, never "claimed but not locked yet".
    if (!liveness::lock_slot(fd, i)) continue;  // another process is claiming it
    if (table().take(i, 0, id, program_)) {
      use_slot_page(fd, i);
      return static_cast<int>(i);
    }
    liveness::unlock_slot(fd, i);
  }
  return -1;
}

int Pool::take_dead_slot(uint64_t id) {
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const uint64_t old = table().slots[i].id.load(std::memory_order_acquire);
    if (old == 0 || old == kReleasingId) continue;
    if (!liveness::lock_slot(ctl_fd_.get(), i)) continue;  // its owner lives
    // The owner is dead. If it died holding the pool lock, the lock's
    // waiters must go on seeing that owner dead to take the lock over:
    // leave its slot alone. A dead process never takes the lock again, so
    // what the word says now is final for it.
    if (futex_lock::owner_of(hdr_->lock.load(std::memory_order_acquire)) == i + 1) {
      liveness::unlock_slot(ctl_fd_.get(), i);
      continue;
    }
    // The slot is ours (we hold its byte); its hold list is still the dead
    // owner's. Drop those holds, then make the slot ours in the table.
    slot_ = i;
    {
      Guard g(*this, Mode::kSlow);
      maintain_locked(true, static_cast<int>(i), old);
    }
    if (table().take(i, 0, id, program_) || table().take(i, old, id, program_)) {
      use_slot_page(ctl_fd_.get(), i);
      return static_cast<int>(i);
    }
    liveness::unlock_slot(ctl_fd_.get(), i);
  }
  return -1;
}

void Pool::claim_slot_or_throw() {
  const uint64_t id = slot_id(pid_, my_kind());
  int s = claim_free_slot(ctl_fd_.get(), id);
  // An observer takes only a free slot: taking a dead one over means
  // reclaiming its blocks, which is the pool's own processes' to do.
  if (s < 0 && observer_)
    throw CoreError(ErrorKind::kPool, "no free slot to look at the pool (limit " +
                                          std::to_string(kMaxSlots) + " processes)");
  if (s < 0) s = take_dead_slot(id);
  if (s < 0)
    throw CoreError(ErrorKind::kPool, "too many processes attached to the pool (limit " +
                                          std::to_string(kMaxSlots) + ")");
  slot_ = static_cast<uint32_t>(s);
}

namespace {

// A new open file description of the file `fd` is open on (a dup() would
// share the description, and with it its locks). /proc/self/fd reaches the
// file even if it was unlinked; without /proc, the name must still lead to
// the same file.
UniqueFd reopen_description(int fd, const std::string& name) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int raw = ::open(path, O_RDWR | O_CLOEXEC);
  if (raw < 0) raw = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (raw < 0) throw_os_error("reopen " + name, errno);
  UniqueFd out(raw);
  struct stat mine, theirs;
  if (::fstat(fd, &mine) != 0 || ::fstat(out.get(), &theirs) != 0 || mine.st_ino != theirs.st_ino ||
      mine.st_dev != theirs.st_dev)
    throw CoreError(ErrorKind::kPool, "the pool's control segment " + name + " was replaced");
  return out;
}

}  // namespace

UniqueFd Pool::open_control_fd() const {
  return reopen_description(ctl_fd_.get(), control_name(token_));
}

std::unique_ptr<Pool> Pool::attach(const std::string& token, const PoolConfig& config,
                                   ProgramRoot root) {
  if (!valid_token(token)) throw CoreError(ErrorKind::kPool, "invalid pool token '" + token + "'");
  if (config.segment_bytes == 0 || config.max_bytes == 0)
    throw CoreError(ErrorKind::kPool, "max_bytes and segment_bytes must be positive");
  bool swept = false;
  for (int attempt = 0; attempt < 2000; ++attempt) {
    if (auto p = attach_existing(token, root)) return p;
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
    UniqueFd fd;
    if (create_segment(tmp_name, kControlBytes, &m, &fd, slot_page_offset(kReservedSlotPages)) ==
        CreateResult::kExists)
      continue;
    auto* h = reinterpret_cast<ControlHeader*>(m.data());
    // The file is zero-filled: only non-zero fields need writing.
    h->layout_version = kLayoutVersion;
    h->control_bytes = static_cast<uint32_t>(kControlBytes);
    h->pool_id = PoolId::from_token(token);
    h->created_realtime_ns = realtime_ns();
    fill_random(h->instance_id, sizeof h->instance_id);
    fill_random(&h->check_key, sizeof h->check_key);
    if (root.pid > 0 && root.start_time != 0) h->root = root;
    h->config = StoredConfig{config.max_bytes, config.segment_bytes, config.transfer_timeout_ns};
    h->decay_ns = config.decay_ns;
    h->state.store(kStateRunning);
    h->segment_count.store(0);
    Allocator(h->alloc, nullptr, 0, 0).reset();
    h->counters = Counters{};
    h->counters.next_generation = 1;
    h->magic.store(kMagic, std::memory_order_release);
    // The slot locks go through a description of their own: the mapping
    // keeps the description it was made from alive for as long as it
    // exists, in fork children too, and a lock on it would outlive us.
    fd = reopen_description(fd.get(), tmp_name);
    // Claim our slot before the pool becomes visible: a cleaner must never
    // see a published pool without a live process.
    if (!liveness::lock_slot(fd.get(), 0)) throw_os_error("lock pool control segment", errno);
    h->table.take(0, 0, slot_id(::getpid(), SlotKind::kActive), program_id(root));
    int linked = ::link(("/dev/shm" + tmp_name).c_str(), ("/dev/shm" + final_name).c_str());
    int link_errno = errno;
    unlink_segment(tmp_name);
    if (linked != 0) {
      if (link_errno == EEXIST) continue;
      throw_os_error("link " + final_name, link_errno);
    }
    std::unique_ptr<Pool> p(new Pool(token, std::move(m)));
    p->ctl_fd_ = std::move(fd);
    p->program_ = program_id(root);
    p->slot_ = 0;
    p->use_slot_page(p->ctl_fd_.get(), 0);
    p->created_ = true;
    return p;
  }
  throw CoreError(ErrorKind::kPool, "could not attach to pool " + token);
}

std::unique_ptr<Pool> Pool::attach_existing(const std::string& token, const ProgramRoot& root) {
  return attach_existing_as(token, false, program_id(root));
}

std::unique_ptr<Pool> Pool::attach_observer(const std::string& token) {
  return attach_existing_as(token, true, 0);
}

std::unique_ptr<Pool> Pool::attach_existing_as(const std::string& token, bool observer,
                                               uint64_t program) {
  // A leaver or cleaner marks the pool dead and removes it within
  // microseconds, or (a leaver) puts it back to running under the lock. A
  // pool still marked dead after this many 1 ms waits, and still linked
  // under its name, was left so by a process killed in between (a pool
  // worker SIGTERMed in its exit): we settle it instead of waiting forever.
  constexpr int kStuckDead = 500;
  int dead_seen = 0;
  for (int attempt = 0; attempt < 2000; ++attempt) {
    Mapping m;
    UniqueFd fd;
    if (!open_segment(control_name(token), kControlBytes, 0, &m, &fd)) {
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
      throw CoreError(ErrorKind::kPool,
                      "/dev/shm" + control_name(token) + " holds another pool than " + token);
    if (h->state.load() == kStateDead && ++dead_seen < kStuckDead) {
      sleep_ms(1);  // its last process is removing it; it will be gone soon
      continue;
    }
    std::unique_ptr<Pool> p(new Pool(token, std::move(m)));
    p->observer_ = observer;
    p->program_ = program;
    // Not the mapping's description (see attach()).
    p->ctl_fd_ = reopen_description(fd.get(), control_name(token));
    p->claim_slot_or_throw();
    // Pairs with leave(): the leaver marks the pool dead, then looks for
    // live slots; we claimed a slot, then look at the state. One of the two
    // sees the other.
    if (h->state.load(std::memory_order_seq_cst) == kStateDead) {
      const StuckDead settled =
          dead_seen >= kStuckDead ? p->settle_stuck_dead() : StuckDead::kRetry;
      if (settled == StuckDead::kRevived) return p;
      p->table().release_if(p->slot_, slot_id(p->pid_, p->my_kind()));
      p->left_ = true;  // and its descriptor, with the slot's lock, closes with it
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
  if (another_process_alive_locked()) return false;
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
    cache_.forget();  // the walk below drops our holds on cached blocks too
    drop_all_holds_locked();
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
  // The last one removes the files while it still counts as alive: the
  // pool's keeper (or a cleaner) meanwhile sees a live process and leaves
  // the removal to us, rather than racing us for it.
  if (last) {
    unlink_data_files(token_);
    step(LeaveStep::kDataUnlinked);
    ::shm_unlink(control_name(token_).c_str());
  }
  // Our slot is freed only after the lock is released: killed while holding
  // the lock, we must still be found dead by the lock's waiters, never
  // replaced in our slot by a live newcomer that they would wait for.
  table().release_if(slot_, slot_id(pid_, my_kind()));
  liveness::unlock_slot(ctl_fd_.get(), slot_);
}

void Pool::exit_process() {
  if (left_) return;
  table().slots[slot_].exiting.store(1, std::memory_order_release);
  bool last = false;
  {
    Guard g(*this, Mode::kSlow);
    // Cached blocks are the exception: no array is left on them (their last
    // one was released), so nothing can still touch them.
    drain_cache_locked();
    const bool root = is_me(hdr_->root);
    if (root) hdr_->root_left.store(1, std::memory_order_seq_cst);
    // The handshake of leave(), but keeping our slot and every hold: the
    // kernel frees the slot when this process is gone, and only then may
    // its blocks be reused.
    hdr_->state.store(kStateDead, std::memory_order_seq_cst);
    last = nobody_needs_pool_locked(root);
    if (!last) hdr_->state.store(kStateRunning, std::memory_order_seq_cst);
    left_ = true;
  }
  if (last) {
    // Nobody can attach any more; our mappings stay valid until we are gone.
    unlink_data_files(token_);
    ::shm_unlink(control_name(token_).c_str());
  }
}

void Pool::before_fork() {
  Guard g(*this, Mode::kSlow);
  // The cache's blocks have no array left on them: they are freed, not
  // copied to the child (which would hold them for nothing).
  cache_.freeze();
  LocalCache::Thawed thawed{cache_};
  cache_.drain_frozen(
      [&](const Block& b) { drop_hold_locked(b.ref, *checked_header(b.ref, b.generation)); });
  // The child's own open file description, locked on its byte now: the
  // child inherits it and keeps it; we close our copy once fork() returns.
  // So the reservation lives exactly as long as the child (or, if the fork
  // fails, until we close it), and dies with an exec of the child.
  UniqueFd fd = open_control_fd();
  int reserved = claim_free_slot(fd.get(), slot_id(pid_, SlotKind::kReserved));
  if (reserved < 0) {
    maintain_locked(false);  // frees the slots of the dead
    reserved = claim_free_slot(fd.get(), slot_id(pid_, SlotKind::kReserved));
  }
  if (reserved < 0) return;  // too many processes: the child attaches on its own
  if (!copy_holds_to_child_locked(static_cast<uint32_t>(reserved))) {
    table().release_if(static_cast<uint32_t>(reserved), slot_id(pid_, SlotKind::kReserved));
    return;  // no room for the child's list: it attaches on its own
  }
  child_fd_ = std::move(fd);
  child_slot_.store(reserved, std::memory_order_relaxed);
}

void Pool::lock_for_fork() {
  local_mutex_.lock();  // released by after_fork_*
  fork_prepared_ = true;
}

void Pool::after_fork_parent() {
  child_slot_.store(-1, std::memory_order_relaxed);
  child_fd_.reset();  // the child has its own reference to it now
  if (fork_prepared_) local_mutex_.unlock();
  fork_prepared_ = false;
}

void Pool::after_fork_child() {
  pid_ = ::getpid();
  cache_.forget();  // the parent's blocks, held by the parent
  const int reserved = child_slot_.exchange(-1);
  if (fork_prepared_) new (&local_mutex_) std::mutex();  // its owner is the parent's thread
  fork_prepared_ = false;
  // Whatever happens next, the parent's description (and its lock) is not
  // ours to keep: it must die with the parent.
  if (left_) {
    ctl_fd_.reset();
    child_fd_.reset();
    return;
  }
  if (reserved >= 0 && child_fd_) {
    ctl_fd_ = std::move(child_fd_);
    slot_ = static_cast<uint32_t>(reserved);
    table().slots[slot_].id.store(slot_id(pid_, SlotKind::kActive), std::memory_order_seq_cst);
    holds_stale_ = true;  // our list is a copy of the parent's, with later additions
    return;
  }
  // No reservation: a slot of our own, then a hold on every block we
  // inherited that still exists (rebuild_hold_index_locked), taken here,
  // before any code of the child can read an inherited array: until then
  // the parent may drop its hold and the pool hand the block to another
  // array. A block already freed is seen (used bit, generation) and the
  // child is detached.
  try {
    UniqueFd mine = open_control_fd();
    ctl_fd_ = std::move(mine);
    claim_slot_or_throw();
    rehold_inherited_ = true;
    holds_stale_ = true;
    Guard g(*this, Mode::kSlow);
  } catch (const CoreError& e) {
    // Our slot, if we claimed one, ends with its descriptor; survivors
    // reclaim whatever we held of it.
    ctl_fd_.reset();
    if (!left_) detach_inherited(e.what());
  } catch (...) {
    ctl_fd_.reset();
    if (!left_) detach_inherited("out of memory");
  }
}

}  // namespace pap
