// The pyarraypool._core module: exceptions, types and functions.
//
// Multi-phase initialization; the module's state is the process's pool
// (process_pool.hpp), which is process-global by nature, so loading the
// module in a second interpreter of the same process is refused.
#define PAP_NUMPY_IMPORT
#include "binding/numpy_api.hpp"
// (numpy_api.hpp must come first: it fills the NumPy API table here.)

#include <string>

#include "binding/module_types.hpp"
#include "binding/pool_logging.hpp"
#include "binding/process_pool.hpp"
#include "core/handle.hpp"
#include "core/pool.hpp"
#include "core/pool_snapshot.hpp"

namespace pyb {
namespace {

constexpr uint64_t kNs = 1'000'000'000ull;

OwnedRef stats_dict(const pap::PoolStats& s) {
  OwnedRef pids = check(PyList_New(0));
  for (int pid : s.pids) {
    OwnedRef p = check(PyLong_FromLong(pid));
    check_status(PyList_Append(pids.get(), p.get()));
  }
  return check(Py_BuildValue(
      "{s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:I,s:O,s:I,s:K,s:K,s:d,s:K,s:K,s:d}", "pool",
      s.token.c_str(), "capacity_bytes", static_cast<unsigned long long>(s.capacity_bytes),
      "used_bytes", static_cast<unsigned long long>(s.used_bytes), "free_bytes",
      static_cast<unsigned long long>(s.free_bytes), "largest_free_block",
      static_cast<unsigned long long>(s.largest_free_block), "live_blocks",
      static_cast<unsigned long long>(s.live_blocks), "pending_transfers",
      static_cast<unsigned long long>(s.pending_transfers), "pending_blocks",
      static_cast<unsigned long long>(s.pending_blocks), "max_bytes",
      static_cast<unsigned long long>(s.config.max_bytes), "processes", s.processes, "pids",
      pids.get(), "segments", s.segments, "segment_bytes",
      static_cast<unsigned long long>(s.config.segment_bytes), "transfer_timeout_ns",
      static_cast<unsigned long long>(s.config.transfer_timeout_ns), "transfer_timeout",
      static_cast<double>(s.config.transfer_timeout_ns) / kNs, "reserved_bytes",
      static_cast<unsigned long long>(s.reserved_bytes), "returned_bytes",
      static_cast<unsigned long long>(s.returned_bytes), "decay",
      static_cast<double>(s.config.decay_ns) / kNs));
}

// Appends `item` to `list`.
void append(PyObject* list, OwnedRef item) { check_status(PyList_Append(list, item.get())); }

// stats_dict plus the walk's detail (see pap::PoolSnapshot for the fields).
OwnedRef snapshot_dict(const pap::PoolSnapshot& s) {
  OwnedRef d = stats_dict(s.stats);
  OwnedRef classes = check(PyList_New(0));
  for (const pap::SizeClassStats& c : s.size_classes)
    append(classes.get(),
           check(Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "min_size",
                               static_cast<unsigned long long>(c.min_size), "max_size",
                               static_cast<unsigned long long>(2 * c.min_size - 1), "used_blocks",
                               static_cast<unsigned long long>(c.used_blocks), "used_bytes",
                               static_cast<unsigned long long>(c.used_bytes), "free_blocks",
                               static_cast<unsigned long long>(c.free_blocks), "free_bytes",
                               static_cast<unsigned long long>(c.free_bytes))));
  OwnedRef holdings = check(PyList_New(0));
  for (const pap::ProcessUsage& u : s.processes)
    append(holdings.get(), check(Py_BuildValue("{s:i,s:I,s:O,s:K,s:K}", "pid", u.pid, "slot",
                                               u.slot, "reserved", u.reserved ? Py_True : Py_False,
                                               "blocks", static_cast<unsigned long long>(u.blocks),
                                               "bytes", static_cast<unsigned long long>(u.bytes))));
  OwnedRef pending = check(PyList_New(0));
  for (const pap::PendingTransfer& t : s.pending)
    append(pending.get(),
           check(Py_BuildValue("{s:K,s:I,s:d,s:d,s:i}", "block_size",
                               static_cast<unsigned long long>(t.block_size), "pickles", t.pickles,
                               "age", static_cast<double>(t.age_ns) / kNs, "expires_in",
                               static_cast<double>(t.expires_in_ns) / kNs, "pid", t.sender_pid)));
  const double oldest = s.pending.empty() ? 0.0 : static_cast<double>(s.pending[0].age_ns) / kNs;
  OwnedRef extra = check(Py_BuildValue(
      "{s:s,s:d,s:O,s:O,s:O,s:K,s:d}", "instance", s.instance.c_str(), "created",
      static_cast<double>(s.created_realtime_ns) / kNs, "size_classes", classes.get(), "holdings",
      holdings.get(), "pending", pending.get(), "pending_bytes",
      static_cast<unsigned long long>(s.pending_bytes), "oldest_pending_age", oldest));
  check_status(PyDict_Update(d.get(), extra.get()));
  return d;
}

std::string describe(const pap::PoolConfig& c) {
  return "max_bytes=" + std::to_string(c.max_bytes) +
         ", segment_bytes=" + std::to_string(c.segment_bytes) +
         ", transfer_timeout=" + std::to_string(static_cast<double>(c.transfer_timeout_ns) / kNs) +
         ", decay=" + std::to_string(static_cast<double>(c.decay_ns) / kNs);
}

PyObject* configure(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    unsigned long long max_bytes, segment_bytes;
    double timeout;
    int strict = 1;
    double decay = -1;  // not given: the one set before
    if (!PyArg_ParseTuple(args, "KKd|pd:_configure", &max_bytes, &segment_bytes, &timeout, &strict,
                          &decay))
      throw PyErrSet{};
    if (max_bytes == 0 || segment_bytes == 0 || !(timeout > 0))
      raise(PyExc_ValueError, "max_bytes, segment_bytes and transfer_timeout must be positive");
    if (decay != -1 && !(decay >= 0 && decay < 1e9))
      raise(PyExc_ValueError, "decay must be a number of seconds, 0 or more");
    ProcessPool& pp = ProcessPool::get();
    pap::PoolConfig cfg{
        max_bytes, segment_bytes, static_cast<uint64_t>(timeout * kNs),
        decay == -1 ? pp.creation_config().decay_ns : static_cast<uint64_t>(decay * kNs)};
    if (!strict) {
      // Defaults and environment at import: they only say how to create the
      // pool, and must not attach this process to it.
      pp.set_creation_config(cfg);
      Py_RETURN_NONE;
    }
    pap::Pool* p = pp.attached();
    if (!p) p = pp.attach_if_exists();
    if (p && !(p->config() == cfg)) {
      std::string msg = "the pool is already running with " + describe(p->config()) +
                        "; configure() must come before the program first uses the pool";
      raise(exceptions().pool_error, msg.c_str());
    }
    pp.set_creation_config(cfg);
    Py_RETURN_NONE;
  });
}

PyObject* settings_error(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&] {
    const char* msg;
    if (!PyArg_ParseTuple(args, "s:_settings_error", &msg)) throw PyErrSet{};
    ProcessPool::get().set_settings_error(msg);
    Py_RETURN_NONE;
  });
}

PyObject* current_config(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    ProcessPool& pp = ProcessPool::get();
    pap::PoolConfig c = pp.attached() ? pp.attached()->config() : pp.creation_config();
    return Py_BuildValue("{s:K,s:K,s:d,s:d}", "max_bytes",
                         static_cast<unsigned long long>(c.max_bytes), "segment_bytes",
                         static_cast<unsigned long long>(c.segment_bytes), "transfer_timeout",
                         static_cast<double>(c.transfer_timeout_ns) / kNs, "decay",
                         static_cast<double>(c.decay_ns) / kNs);
  });
}

PyObject* stats(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&] {
    int detail = 0;
    if (!PyArg_ParseTuple(args, "|p:_stats", &detail)) throw PyErrSet{};
    pap::Pool& p = ProcessPool::get().pool();
    if (detail) {
      pap::PoolSnapshot s = without_gil([&] { return p.snapshot(); });
      report_pool_events(&p);
      return snapshot_dict(s).release();
    }
    pap::PoolStats s = without_gil([&] { return p.stats(); });
    report_pool_events(&p);
    return stats_dict(s).release();
  });
}

PyObject* collect(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    pap::Pool& p = ProcessPool::get().pool();
    uint64_t freed = without_gil([&] { return p.collect(); });
    report_pool_events(&p);
    return PyLong_FromUnsignedLongLong(freed);
  });
}

PyObject* shutdown(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    ProcessPool::get().shutdown();
    Py_RETURN_NONE;
  });
}

PyObject* before_fork(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    ProcessPool::get().before_fork();
    Py_RETURN_NONE;
  });
}

PyObject* pool_token(PyObject*, PyObject*) {
  pap::Pool* p = ProcessPool::get().attached();
  if (!p) Py_RETURN_NONE;
  return PyUnicode_FromString(p->token().c_str());
}

// What tells this pool apart from every other: a scheduler compares two
// processes' identities to know whether a handle from one can load in the
// other (same host boot and same pool instance).
PyObject* pool_identity(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    pap::Pool& p = ProcessPool::get().pool();
    std::string boot = pap::boot_id();
    return Py_BuildValue("{s:s,s:s,s:s}", "token", p.token().c_str(), "instance",
                         p.instance_id().c_str(), "boot_id", boot.c_str());
  });
}

PyObject* clean(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&] {
    int dry_run = 0;
    if (!PyArg_ParseTuple(args, "p:_clean", &dry_run)) throw PyErrSet{};
    pap::Pool* p = ProcessPool::get().attached();
    std::string keep = p ? p->token() : std::string();
    auto names = without_gil([&] { return pap::Pool::clean_stale(dry_run != 0, keep); });
    OwnedRef out = check(PyList_New(0));
    for (const auto& n : names) {
      OwnedRef s = check(PyUnicode_FromString(n.c_str()));
      check_status(PyList_Append(out.get(), s.get()));
    }
    return out.release();
  });
}

PyObject* inspect(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    const char* token;
    int detail = 0;
    if (!PyArg_ParseTuple(args, "s|p:_inspect", &token, &detail)) throw PyErrSet{};
    std::string t = token;
    // Looks as an observer: not counted among the pool's processes, and no
    // reclaim or expiry of its own (those, and their warnings, belong to
    // the pool's processes); only the repair after a dead lock owner.
    std::unique_ptr<pap::Pool> p = without_gil([&] { return pap::Pool::attach_observer(t); });
    if (!p) Py_RETURN_NONE;
    struct Leave {  // also when the snapshot fails
      std::unique_ptr<pap::Pool>& p;
      ~Leave() {
        try {
          without_gil([&] { p->leave(false); });
        } catch (...) {
        }
        log_pool_events(*p);
      }
    } leave{p};
    if (detail) return snapshot_dict(without_gil([&] { return p->snapshot(); })).release();
    return stats_dict(without_gil([&] { return p->stats(); })).release();
  });
}

PyObject* verify(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    pap::Pool& p = ProcessPool::get().pool();
    without_gil([&] { p.verify(); });
    Py_RETURN_NONE;
  });
}

PyObject* lock_forever(PyObject*, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] {
    pap::Pool& p = ProcessPool::get().pool();
    without_gil([&] { p.lock_forever(); });
    Py_RETURN_NONE;
  });
}

PyObject* hold_lock(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&] {
    double seconds;
    if (!PyArg_ParseTuple(args, "d:_test_hold_lock", &seconds)) throw PyErrSet{};
    if (!(seconds >= 0) || seconds > 60) raise(PyExc_ValueError, "seconds must be in [0, 60]");
    pap::Pool& p = ProcessPool::get().pool();
    without_gil([&] { p.hold_lock_for(static_cast<uint64_t>(seconds * 1e9)); });
    Py_RETURN_NONE;
  });
}

PyObject* block_info(PyObject*, PyObject* arr) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    OwnedRef block = check(block_of(nullptr, arr));
    if (block.get() == Py_None) raise(PyExc_ValueError, "the array does not live in the pool");
    auto* b = reinterpret_cast<BlockObject*>(block.get());
    pap::Pool& p = ProcessPool::get().pool();
    pap::Pool::BlockInfo info = without_gil([&] { return p.inspect_block(b->ref); });
    // The live slots whose hold list names the block, as one Python int:
    // bit i is process slot i.
    OwnedRef holders = check(PyLong_FromLong(0));
    OwnedRef one = check(PyLong_FromLong(1));
    for (uint32_t slot : info.holder_slots) {
      OwnedRef shift = check(PyLong_FromUnsignedLong(slot));
      OwnedRef bit = check(PyNumber_Lshift(one.get(), shift.get()));
      holders = check(PyNumber_Or(holders.get(), bit.get()));
    }
    return Py_BuildValue("{s:O,s:K,s:K,s:K,s:K,s:O,s:I,s:I,s:I,s:O,s:I,s:K}", "used",
                         info.used ? Py_True : Py_False, "segment",
                         static_cast<unsigned long long>(b->ref.seg()), "offset",
                         static_cast<unsigned long long>(b->ref.off()), "size",
                         static_cast<unsigned long long>(info.size), "generation",
                         static_cast<unsigned long long>(info.generation), "holders", holders.get(),
                         "holder_count", info.holders, "pending", info.pending, "flags", info.flags,
                         "check_ok", info.check_ok ? Py_True : Py_False, "my_slot", p.slot(),
                         "capacity", static_cast<unsigned long long>(b->capacity));
  });
}

PyMethodDef module_methods[] = {
    {"make_transferable",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(make_transferable)),
     METH_VARARGS | METH_KEYWORDS,
     "make_transferable(arr, *, transfer_required=True)\n--\n\n"
     "Copy an array once into the shared-memory pool.\n\n"
     "Pickling the result (as multiprocessing does with arguments and results) carries a\n"
     "small handle instead of the data, and every process that loads the handle sees the\n"
     "same memory. An array already in the pool is returned as it is, without a copy.\n\n"
     "Parameters\n"
     "----------\n"
     "arr : array_like\n"
     "    The data: an array, or anything numpy.asarray accepts, of a dtype without\n"
     "    Python objects. C, Fortran and non-contiguous arrays all work.\n"
     "transfer_required : bool, optional\n"
     "    If true (the default), every pickle of the array keeps its block alive until\n"
     "    some process loads it, so a worker can return the array and exit. If false,\n"
     "    the block is freed as soon as no process holds it, and loading a late pickle\n"
     "    raises StaleHandleError. For an array already in the pool the setting is\n"
     "    its block's and cannot change: leave it out, or give the same value.\n\n"
     "Returns\n"
     "-------\n"
     "TransferableArray\n"
     "    The copy in the pool, or `arr` itself if it already lives there.\n\n"
     "Raises\n"
     "------\n"
     "TypeError\n"
     "    The dtype holds Python objects (object dtype, numpy's StringDType).\n"
     "ValueError\n"
     "    `arr` already lives in the pool, in a block made with the other\n"
     "    transfer_required: no silent copy (writes would no longer be shared);\n"
     "    make_transferable(arr.copy(), transfer_required=...) makes one.\n"
     "PoolFullError\n"
     "    The pool cannot grow to hold the array under max_bytes, or /dev/shm is full.\n"},
    {"_empty", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(empty_impl)),
     METH_VARARGS | METH_KEYWORDS, "Allocate an array in the pool (see pyarraypool.empty)."},
    {"_rebuild", rebuild, METH_VARARGS, "Load a pickled handle (used by pickle)."},
    {"_block_of", block_of, METH_O, "The _Block an array lives in, or None."},
    {"_auto_reduce", auto_reduce, METH_O,
     "Auto mode: the reduce value of a private copy of a plain ndarray in the pool, or "
     "NotImplemented for a dtype the pool cannot hold."},
    {"_configure", configure, METH_VARARGS, "Set the pool settings (see pyarraypool.configure)."},
    {"_config", current_config, METH_NOARGS, "The settings in force."},
    {"_settings_error", settings_error, METH_VARARGS,
     "_settings_error(msg): the ValueError the first use of the pool raises (\"\": none)."},
    {"_stats", stats, METH_VARARGS,
     "_stats(detail=False): pool statistics as a dict; with detail, also size classes, "
     "holdings per process and pending transfers (walks every block)."},
    {"collect", collect, METH_NOARGS,
     "collect() -> int\n--\n\n"
     "Reclaim what dead processes held and pickles whose transfer_timeout has passed.\n\n"
     "Both also happen on their own (when the pool is out of room, in stats(), and when\n"
     "a waiter takes the lock over from a dead process); collect() does it now. It\n"
     "also empties this process's cache of its own freed small blocks.\n\n"
     "Returns\n"
     "-------\n"
     "int\n"
     "    The bytes given back to the pool.\n\n"
     "Raises\n"
     "------\n"
     "PoolError\n"
     "    The pool cannot be attached.\n"},
    {"_shutdown", shutdown, METH_NOARGS, "Detach this process from the pool (at exit)."},
    {"_before_fork", before_fork, METH_NOARGS, nullptr},
    {"_pool_token", pool_token, METH_NOARGS, "Token of the attached pool, or None."},
    {"_pool_identity", pool_identity, METH_NOARGS,
     "The attached pool's identity: {'token', 'instance', 'boot_id'} (attaches if needed)."},
    {"_clean", clean, METH_VARARGS, "Remove pools whose processes are all dead."},
    {"_inspect", inspect, METH_VARARGS,
     "_inspect(token, detail=False): statistics of a pool by token, or None; see _stats."},
    {"_verify", verify, METH_NOARGS, "Check every pool invariant (tests)."},
    {"_test_lock_forever", lock_forever, METH_NOARGS,
     "Test hook: take the pool lock and never release it (crash tests)."},
    {"_test_hold_lock", hold_lock, METH_VARARGS,
     "Test hook: hold the pool lock for the given seconds (crash tests kill inside it)."},
    {"_test_block_info", block_info, METH_O,
     "Test hook: the header of the block an array lives in (used, size, generation, holders "
     "as an int bitmask of the live slots whose hold list names it, holder_count as the "
     "header says, pending, flags, check_ok, my_slot)."},
    {nullptr, nullptr, 0, nullptr},
};

int add_exceptions(PyObject* m) {
  Exceptions& ex = exceptions();
  if (!ex.pool_error) {
    ex.pool_error = PyErr_NewExceptionWithDoc(
        "pyarraypool.PoolError",
        "Base class of pyarraypool's errors. Raised itself when the pool cannot be attached\n"
        "(4096 processes already are, the pool is damaged) or when configure() conflicts\n"
        "with the settings of the running pool.",
        nullptr, nullptr);
    if (!ex.pool_error) return -1;
    OwnedRef full_bases = OwnedRef::steal(PyTuple_Pack(2, ex.pool_error, PyExc_MemoryError));
    OwnedRef invalid_bases = OwnedRef::steal(PyTuple_Pack(2, ex.pool_error, PyExc_ValueError));
    if (!full_bases || !invalid_bases) return -1;
    ex.pool_full = PyErr_NewExceptionWithDoc(
        "pyarraypool.PoolFullError",
        "The pool cannot hold the request: it would grow past max_bytes, or /dev/shm has\n"
        "no room. Also a MemoryError. The message names the sizes, and the setting to\n"
        "raise (max_bytes, or the container's --shm-size).",
        full_bases.get(), nullptr);
    ex.stale_handle = PyErr_NewExceptionWithDoc(
        "pyarraypool.StaleHandleError",
        "A handle names a block that has been freed (or freed and reused for another\n"
        "array), or a block of another pool: another program's, or one that has ended\n"
        "(also when a new pool has the same name). A pickle of a pool array is a handle,\n"
        "not data: to keep the data, pickle x.copy() or save it with np.save.",
        ex.pool_error, nullptr);
    ex.invalid_handle = PyErr_NewExceptionWithDoc(
        "pyarraypool.InvalidHandleError",
        "A handle is malformed, or describes bytes outside its block. Also a ValueError.",
        invalid_bases.get(), nullptr);
    if (!ex.pool_full || !ex.stale_handle || !ex.invalid_handle) return -1;
  }
  if (PyModule_AddObjectRef(m, "PoolError", ex.pool_error) < 0 ||
      PyModule_AddObjectRef(m, "PoolFullError", ex.pool_full) < 0 ||
      PyModule_AddObjectRef(m, "StaleHandleError", ex.stale_handle) < 0 ||
      PyModule_AddObjectRef(m, "InvalidHandleError", ex.invalid_handle) < 0)
    return -1;
  return 0;
}

int module_exec(PyObject* m) {
  static bool loaded = false;
  if (loaded) {
    PyErr_SetString(PyExc_ImportError, "pyarraypool._core can be loaded only once per process");
    return -1;
  }
  if (PyArray_ImportNumPyAPI() < 0) return -1;
  if (add_exceptions(m) < 0 || add_block_type(m) < 0 || add_array_type(m) < 0) return -1;
  rebuild_function = PyObject_GetAttrString(m, "_rebuild");  // kept for the process
  if (!rebuild_function) return -1;
  loaded = true;
  return 0;
}

PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, reinterpret_cast<void*>(module_exec)},
    {0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "pyarraypool._core",
    "The C++ core of pyarraypool: the pool, the TransferableArray type and handles.",
    0,
    module_methods,
    module_slots,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace
}  // namespace pyb

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&pyb::module_def); }
