#include "binding/process_pool.hpp"

#include <cstdlib>
#include <string>

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

// Calls `op(mode)` first in kFast with the GIL held (the common case: the
// lock is free and no system call is needed), and only if that declines,
// again in kSlow with the GIL released.
template <class Op>
auto call(Op&& op) {
  if (auto r = op(pap::Mode::kFast)) return r;
  return without_gil([&] { return op(pap::Mode::kSlow); });
}

}  // namespace

ProcessPool::ProcessPool()
    : creation_config_{uint64_t{1} << 34, uint64_t{64} << 20, uint64_t{300} * 1'000'000'000ull} {}

ProcessPool& ProcessPool::get() {
  // Never destroyed: blocks may be released by objects that outlive module
  // teardown at interpreter exit.
  static ProcessPool* instance = new ProcessPool();
  return *instance;
}

pap::Pool& ProcessPool::pool() {
  if (shut_down_)
    raise(exceptions().pool_error, "pyarraypool has been shut down in this process (exiting)");
  if (!pool_) {
    std::string token = token_from_env();
    pap::PoolConfig cfg = creation_config_;
    pool_ = without_gil([&] { return pap::Pool::attach(token, cfg); });
  }
  return *pool_;
}

pap::Pool* ProcessPool::attach_if_exists() {
  if (shut_down_) return nullptr;
  if (!pool_) {
    std::string token = token_from_env();
    pool_ = without_gil([&] { return pap::Pool::attach_existing(token); });
  }
  return pool_.get();
}

PyObject* ProcessPool::block_object(const pap::Block& b) {
  auto it = blocks_.find(b.ref.bits());
  if (it != blocks_.end()) {
    // Already held by this process: the hold `b` stands for is the same bit.
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
  blocks_.emplace(b.ref.bits(), o);
  return reinterpret_cast<PyObject*>(o);
}

pap::Block ProcessPool::allocate(uint64_t bytes, bool transfer_required) {
  pap::Pool& p = pool();
  return *call([&](pap::Mode m) { return p.allocate(bytes, transfer_required, m); });
}

void ProcessPool::release(pap::BlockRef ref, uint64_t generation) {
  pap::Pool* p = attached();
  if (!p) return;  // after shutdown the pool has already dropped our holds
  call([&](pap::Mode m) { return p->release(ref, generation, m); });
}

void ProcessPool::add_pending(pap::BlockRef ref, uint64_t generation) {
  pap::Pool& p = pool();
  call([&](pap::Mode m) { return p.add_pending(ref, generation, m); });
}

pap::Block ProcessPool::attach_block(const pap::Handle& h, uint64_t lo, uint64_t hi) {
  pap::Pool& p = pool();
  return *call([&](pap::Mode m) { return p.attach_block(h, lo, hi, m); });
}

void ProcessPool::shutdown() {
  if (shut_down_) return;
  // A process that never used the pool still leaves it: when only its
  // workers used it (and they ended with os._exit), this is the last
  // process of the program and must unlink the segments.
  if (!pool_ && std::getenv("PYARRAYPOOL_POOL")) {
    try {
      attach_if_exists();
    } catch (...) {
      PyErr_Clear();  // nothing to leave
    }
  }
  if (pool_) without_gil([&] { pool_->leave(); });
  shut_down_ = true;
  // Arrays that outlive this point keep their memory mapped (the mappings
  // are never unmapped) but no longer count as holds.
  blocks_.clear();
}

void ProcessPool::before_fork() {
  pap::Pool* p = attached();
  if (!p) return;
  std::vector<std::pair<pap::BlockRef, uint64_t>> held;
  held.reserve(blocks_.size());
  for (const auto& [bits, b] : blocks_) held.emplace_back(b->ref, b->generation);
  without_gil([&] { p->before_fork(held); });
}

void ProcessPool::after_fork_parent() {
  if (pap::Pool* p = attached()) p->after_fork_parent();
}

void ProcessPool::after_fork_child() {
  if (pap::Pool* p = attached()) p->after_fork_child();
}

}  // namespace pyb
