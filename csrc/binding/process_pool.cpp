#include "binding/process_pool.hpp"

#include <pthread.h>

#include <cstdlib>
#include <new>
#include <string>

#include "binding/keeper.hpp"
#include "binding/pool_logging.hpp"

namespace pyb {

PyTypeObject* block_type = nullptr;

namespace {

const char* token_from_env() {
  const char* t = std::getenv("PYARRAYPOOL_POOL");
  if (!t || !*t)
    raise(exceptions().pool_error,
          "PYARRAYPOOL_POOL is not set: import pyarraypool (not pyarraypool._core) first");
  return t;
}

// Logs what maintenance reclaimed when the scope ends (with the GIL held),
// also when it ends by an exception: only kSlow runs maintenance, so only
// the slow paths below need one.
class EventReport {
 public:
  EventReport() = default;
  ~EventReport() { report_pool_events(ProcessPool::get().attached()); }
  EventReport(const EventReport&) = delete;
  EventReport& operator=(const EventReport&) = delete;
};

// PYARRAYPOOL_ROOT = "<pid>:<start time in clock ticks>[:<pid namespace
// inode>]", set by the import that picked the pool's token
// (pyarraypool/_lifecycle.py); anything else means no root is known.
pap::ProgramRoot root_from_env() {
  pap::ProgramRoot root;
  const char* v = std::getenv("PYARRAYPOOL_ROOT");
  if (!v) return root;
  char* end = nullptr;
  long pid = std::strtol(v, &end, 10);
  if (end == v || *end != ':' || pid <= 0) return root;
  const char* rest = end + 1;
  unsigned long long start = std::strtoull(rest, &end, 10);
  if (end == rest || (*end != '\0' && *end != ':')) return root;
  unsigned long long ns = 0;
  if (*end == ':') {
    rest = end + 1;
    ns = std::strtoull(rest, &end, 10);
    if (end == rest || *end != '\0') return root;
  }
  root.pid = static_cast<int>(pid);
  root.start_time = start;
  root.pid_ns = ns;
  return root;
}

// Calls `op(mode)` first in kFast with the GIL held (the common case: the
// lock is free and no system call is needed), and only if that declines,
// again in kSlow with the GIL released.
template <class Op>
auto call(Op&& op) {
  if (auto r = op(pap::Mode::kFast)) return r;
  EventReport report;
  return without_gil([&] { return op(pap::Mode::kSlow); });
}

}  // namespace

ProcessPool::ProcessPool()
    : creation_config_{uint64_t{1} << 34, uint64_t{64} << 20, uint64_t{300} * 1'000'000'000ull} {}

ProcessPool& ProcessPool::get() {
  // Never destroyed: blocks may be released by objects that outlive module
  // teardown at interpreter exit.
  static ProcessPool* instance = [] {
    auto* pp = new ProcessPool();
    // fork() is finished in C, in pthread_atfork handlers: the child handler
    // runs inside fork() itself, before any Python code of the child (the
    // after-fork hooks of os.register_at_fork, a library's among them, may
    // drop pool arrays, and must do so as the child, not as the parent).
    pthread_atfork([] { ProcessPool::get().lock_for_fork(); },
                   [] { ProcessPool::get().after_fork_parent(); },
                   [] { ProcessPool::get().after_fork_child(); });
    return pp;
  }();
  return *instance;
}

pap::Pool& ProcessPool::pool() {
  if (shut_down_)
    raise(exceptions().pool_error, "pyarraypool has been shut down in this process (exiting)");
  if (pap::Pool* p = pool_.load(std::memory_order_acquire)) return *p;
  if (!settings_error_.empty()) raise(PyExc_ValueError, settings_error_.c_str());
  std::string token = token_from_env();
  pap::PoolConfig cfg = creation_config_;
  EventReport report;  // attaching may take over a dead process's slot
  pap::ProgramRoot root = root_from_env();
  bool created = false;
  without_gil([&] {
    std::lock_guard<std::mutex> once(attach_mutex_);
    if (!pool_.load(std::memory_order_acquire)) {
      publish(pap::Pool::attach(token, cfg, root));
      created = pool_owner_->created();
    }
  });
  // Whoever makes the pool starts its keeper, once (keeper.hpp).
  if (created) start_keeper(*pool_owner_);
  return *pool_.load(std::memory_order_acquire);
}

void ProcessPool::publish(std::unique_ptr<pap::Pool> p) {
  pool_owner_ = std::move(p);
  pool_.store(pool_owner_.get(), std::memory_order_release);
}

pap::Pool* ProcessPool::attach_if_exists() {
  if (shut_down_) return nullptr;
  if (!pool_.load(std::memory_order_acquire)) {
    std::string token = token_from_env();
    const pap::ProgramRoot root = root_from_env();
    without_gil([&] {
      std::lock_guard<std::mutex> once(attach_mutex_);
      if (!pool_.load(std::memory_order_acquire)) publish(pap::Pool::attach_existing(token, root));
    });
  }
  return pool_.load(std::memory_order_acquire);
}

PyObject* ProcessPool::block_object(const pap::Block& b, bool shared) {
  auto it = blocks_.find(b.ref.bits());
  if (it != blocks_.end()) {
    // Already held by this process: the hold `b` stands for is the same bit,
    // and the existing object stands for it.
    {
      std::lock_guard<std::mutex> g(hold_mutex_);
      --holds_[b.ref.bits()];
    }
    it->second->shared |= shared || fork_in_progress_;
    Py_INCREF(it->second);
    return reinterpret_cast<PyObject*>(it->second);
  }
  auto* o = PyObject_New(BlockObject, block_type);
  if (!o) {
    // Keep the accounting right even when Python is out of memory.
    release(b.ref, b.generation);
    throw PyErrSet{};
  }
  o->ref = b.ref;
  o->generation = b.generation;
  o->payload = b.payload;
  o->capacity = b.capacity;
  o->flags = b.flags;
  o->shared = shared || fork_in_progress_;  // a child being forked holds it too
  blocks_.emplace(b.ref.bits(), o);
  return reinterpret_cast<PyObject*>(o);
}

void ProcessPool::record_hold(pap::BlockRef ref) {
  std::lock_guard<std::mutex> g(hold_mutex_);
  ++holds_[ref.bits()];
}

pap::Block ProcessPool::allocate(uint64_t bytes, uint32_t flags) {
  pap::Pool& p = pool();
  pap::Block b = *call([&](pap::Mode m) { return p.allocate(bytes, flags, m); });
  record_hold(b.ref);
  return b;
}

void ProcessPool::release(pap::BlockRef ref, uint64_t generation) {
  BlockObject b{};
  b.ref = ref;
  b.generation = generation;
  b.shared = true;
  release(b);
}

void ProcessPool::release(const BlockObject& b) {
  pap::Pool* p = attached();
  if (!p) return;  // after shutdown the pool has already dropped our holds
  const uint64_t key = b.ref.bits();
  const pap::Block block{b.ref, b.generation, b.payload, b.capacity, b.flags};
  auto core_release = [&](pap::Mode m) {
    return b.shared ? p->release(b.ref, b.generation, m) : p->release_unshared(block, m);
  };
  // Fast: the hold count and the pool both free right now.
  bool counted = false;
  {
    std::unique_lock<std::mutex> g(hold_mutex_, std::try_to_lock);
    if (g.owns_lock()) {
      counted = true;
      auto it = holds_.find(key);
      if (it != holds_.end() && it->second > 1) {
        --it->second;  // another hold of this process remains
        return;
      }
      if (core_release(pap::Mode::kFast)) {
        if (it != holds_.end()) holds_.erase(it);
        return;
      }
      // Left at 0: "being released". A thread that loads a handle to this
      // block meanwhile raises it again and takes over the bit.
      if (it != holds_.end())
        it->second = 0;
      else
        holds_.emplace(key, 0);
    }
  }
  EventReport report;
  without_gil([&] {
    std::lock_guard<std::mutex> g(hold_mutex_);
    auto it = holds_.find(key);
    if (counted) {
      // Gone: the thread that re-took it has released it already. Raised:
      // re-taken, the bit is that thread's now.
      if (it == holds_.end() || it->second > 0) return;
    } else if (it != holds_.end() && --it->second > 0) {
      return;
    }
    if (it != holds_.end()) holds_.erase(it);
    core_release(pap::Mode::kSlow);
  });
}

void ProcessPool::add_pending(pap::BlockRef ref, uint64_t generation) {
  pap::Pool& p = pool();
  call([&](pap::Mode m) { return p.add_pending(ref, generation, m); });
}

pap::Block ProcessPool::attach_block(const pap::Handle& h, uint64_t lo, uint64_t hi) {
  pap::Pool& p = pool();
  {
    std::unique_lock<std::mutex> g(hold_mutex_, std::try_to_lock);
    if (g.owns_lock()) {
      if (auto b = p.attach_block(h, lo, hi, pap::Mode::kFast)) {
        ++holds_[b->ref.bits()];
        return *b;
      }
    }
  }
  EventReport report;
  return without_gil([&] {
    std::lock_guard<std::mutex> g(hold_mutex_);
    pap::Block b = *p.attach_block(h, lo, hi, pap::Mode::kSlow);
    ++holds_[b.ref.bits()];
    return b;
  });
}

void ProcessPool::shutdown() {
  if (shut_down_) return;
  // A process that never used the pool still leaves it: when only its
  // workers used it (and they ended with os._exit), this is the last
  // process of the program and must unlink the segments.
  if (!pool_.load() && std::getenv("PYARRAYPOOL_POOL")) {
    try {
      attach_if_exists();
    } catch (...) {
      PyErr_Clear();  // nothing to leave
    }
  }
  shut_down_ = true;  // whatever happens below, no hold is released after this
  finish_keeper_start();
  if (pap::Pool* p = pool_.load()) {
    // No hold is dropped: daemon threads, later exit handlers and copies
    // running without the GIL may still touch pool memory until this
    // process is gone. The kernel then drops our slot, and the pool's other
    // processes take back what we held.
    without_gil([&] { p->exit_process(); });
    report_pool_events(p);
  }
  blocks_.clear();
  std::lock_guard<std::mutex> g(hold_mutex_);
  holds_.clear();
}

void ProcessPool::before_fork() {
  // The thread spawning the keeper must be gone before the fork: a fork of
  // a process with another thread may leave the child a lock that thread
  // held, and Python 3.12+ warns ("This process is multi-threaded") from
  // os.fork(). It lives for milliseconds at most.
  finish_keeper_start();
  pap::Pool* p = attached();
  if (!p) return;
  fork_in_progress_ = true;
  for (const auto& [bits, b] : blocks_) b->shared = true;  // the child holds it too
  // With the GIL held, although this may wait for the pool lock (its
  // holders never wait for the GIL, so this cannot deadlock): released here,
  // another thread could publish a block it allocated a moment before
  // after the child's copy of our hold list is made but before the copying
  // of later holds to the child starts. A failure is not fatal: the child
  // then claims a slot of its own and holds what it inherited itself.
  try {
    p->before_fork();
  } catch (const pap::CoreError&) {
  }
}

void ProcessPool::lock_for_fork() {
  // The last thing before the fork, after every Python before-fork hook (a
  // hook that allocates must not find these taken): no thread may be
  // half-way through changing the hold table or the core's local state at
  // the instant the child's copy of this process is made.
  if (pap::Pool* p = attached()) {
    hold_mutex_.lock();
    fork_locked_ = true;
    p->lock_for_fork();
  }
}

void ProcessPool::after_fork_parent() {
  fork_in_progress_ = false;
  pap::Pool* p = pool_.load(std::memory_order_acquire);
  if (p) p->after_fork_parent();
  if (fork_locked_) hold_mutex_.unlock();
  fork_locked_ = false;
}

void ProcessPool::after_fork_child() {
  fork_in_progress_ = false;
  fork_locked_ = false;
  // Only the forking thread exists in the child: no other thread can hold
  // these mutexes' state there; start them afresh.
  new (&hold_mutex_) std::mutex();
  new (&attach_mutex_) std::mutex();
  if (pap::Pool* p = pool_.load(std::memory_order_acquire)) {
    // The event log first: nothing below may log the parent's events or
    // wait on its mutex as another parent thread left it.
    p->reset_events_after_fork();
    p->after_fork_child();  // catches its own errors: nothing may leave a fork handler
  }
}

}  // namespace pyb
