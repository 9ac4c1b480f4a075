// This process's side of the pool: the attachment, the table of blocks this
// process holds, and the calls into the core with the GIL handled.
//
// There is exactly one pool per process (all processes of a program share
// it), so this state is process-global rather than per module object.
// Everything here runs with the GIL held, which is what serializes access to
// the block table; the core calls that may wait or make system calls run
// with the GIL released (see call()).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "binding/numpy_api.hpp"
#include "binding/py_errors.hpp"
#include "core/pool.hpp"

namespace pyb {

// The Python object that owns this process's hold on one block. Arrays on
// the block have it as their `base`, so the block is held exactly as long as
// some array, view, memoryview or np.asarray result still reaches it. There
// is at most one per block per process (interned in ProcessPool).
struct BlockObject {
  PyObject_HEAD pap::BlockRef ref;
  uint64_t generation;
  unsigned char* payload;
  uint64_t capacity;
  uint32_t flags;
  // Whether another process may know this block: it was loaded from a
  // handle, a handle was made for it, or the process forked while holding
  // it. An unshared block may go to the local cache when released.
  bool shared;
};

extern PyTypeObject* block_type;
inline bool is_block(PyObject* o) { return Py_TYPE(o) == block_type; }

class ProcessPool {
 public:
  static ProcessPool& get();

  // The pool, attached (or created) on first use.
  pap::Pool& pool();
  // The pool if attached and not shut down, else nullptr.
  pap::Pool* attached() {
    pap::Pool* p = pool_.load(std::memory_order_acquire);
    return shut_down_ || !p || p->left() ? nullptr : p;
  }

  // Settings for creating the pool; see module.cpp for the rules.
  void set_creation_config(const pap::PoolConfig& c) { creation_config_ = c; }
  const pap::PoolConfig& creation_config() const { return creation_config_; }
  // A PYARRAYPOOL_* variable that could not be read (its message names it),
  // or "" when all could: attaching raises ValueError with it. Kept rather
  // than raised at import, so that the import and the command line (which
  // reads no setting) work; configure() clears it by giving the setting.
  void set_settings_error(std::string msg) { settings_error_ = std::move(msg); }
  // Attaches to an existing pool of this program without creating one.
  pap::Pool* attach_if_exists();

  // New reference to the BlockObject for `b`: the one this process already
  // has, or a new one that takes over the hold `b` stands for. `shared`:
  // `b` came from a handle.
  PyObject* block_object(const pap::Block& b, bool shared);
  void forget(BlockObject* b) { blocks_.erase(b->ref.bits()); }

  // `flags`: pap::kFlagTransferRequired (what `true` converts to), pap::kFlagPrivate.
  pap::Block allocate(uint64_t bytes, uint32_t flags);
  void release(pap::BlockRef ref, uint64_t generation);
  void release(const BlockObject& b);
  void add_pending(pap::BlockRef ref, uint64_t generation);
  pap::Block attach_block(const pap::Handle& h, uint64_t lo, uint64_t hi);

  void shutdown();
  // fork(): before_fork is the os.register_at_fork hook (GIL held); the
  // others are pthread_atfork handlers.
  void before_fork();
  void lock_for_fork();
  void after_fork_parent();
  void after_fork_child();

 private:
  ProcessPool();
  void record_hold(pap::BlockRef ref);
  void publish(std::unique_ptr<pap::Pool> p);  // under attach_mutex_

  // Published with release once attached (a thread may attach with the GIL
  // released while another reads it); owned by pool_owner_, never freed.
  std::atomic<pap::Pool*> pool_{nullptr};
  std::unique_ptr<pap::Pool> pool_owner_;
  std::mutex attach_mutex_;  // one attachment, however many threads start at once
  bool shut_down_ = false;
  bool fork_in_progress_ = false;  // between before_fork and after_fork_*
  bool fork_locked_ = false;       // hold_mutex_ taken by lock_for_fork
  pap::PoolConfig creation_config_;
  std::string settings_error_;
  std::unordered_map<uint64_t, BlockObject*> blocks_;  // borrowed: removed on dealloc

  // This process's holds per block: live BlockObjects plus attaches whose
  // BlockObject is not made yet. The pool's hold (hold list entry and
  // holder count) is dropped only when this reaches 0 under hold_mutex_, so
  // a thread releasing the last object (with the GIL released, in kSlow)
  // cannot drop the hold another thread has just re-taken by loading a
  // handle. Never held while calling into
  // Python; lock order: hold_mutex_, then the pool lock.
  std::mutex hold_mutex_;
  std::unordered_map<uint64_t, uint32_t> holds_;
};

}  // namespace pyb
