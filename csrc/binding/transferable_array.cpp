// TransferableArray: the ndarray subclass whose memory is a pool block.
//
// The type adds no C fields (ndarray's struct size differs between NumPy
// versions) and keeps no state of its own: an instance's memory is a pool
// block exactly when its chain of `base` objects reaches a _Block. That
// makes views, np.asarray() results and memoryviews keep the block alive
// through ordinary reference counting.
//
// Instances that do not live in the pool (a copy, a ufunc result, fancy
// indexing) would be misleading: they cannot travel by handle. Every path
// that makes one hands back a plain ndarray instead (__array_wrap__ for
// ufuncs and reductions, __array_function__ for numpy functions, the
// methods that copy, and indexing). One that slips through anyway pickles by
// value, like any ndarray.
#include <cstring>
#include <string>

#include "binding/module_types.hpp"
#include "binding/process_pool.hpp"
#include "core/handle.hpp"

namespace pyb {

PyTypeObject* array_type = nullptr;
PyObject* rebuild_function = nullptr;

namespace {

// Copies at least this large run with the GIL released.
constexpr uint64_t kReleaseGilBytes = uint64_t{1} << 20;

bool is_array_subtype(PyObject* o) { return PyObject_TypeCheck(o, array_type); }

// The _Block whose memory `o` lives in, or nullptr. Borrowed.
BlockObject* find_block(PyObject* o) {
  for (int depth = 0; o && depth < 64; ++depth) {
    if (is_block(o)) return reinterpret_cast<BlockObject*>(o);
    if (!PyArray_Check(o)) return nullptr;
    o = PyArray_BASE(reinterpret_cast<PyArrayObject*>(o));
  }
  return nullptr;
}

// A plain ndarray for a TransferableArray that does not live in the pool;
// anything else unchanged. Tuples and lists (np.split, divmod) element-wise.
OwnedRef plainify(OwnedRef obj) {
  PyObject* o = obj.get();
  if (PyTuple_CheckExact(o) || PyList_CheckExact(o)) {
    bool tuple = PyTuple_CheckExact(o);
    Py_ssize_t n = tuple ? PyTuple_GET_SIZE(o) : PyList_GET_SIZE(o);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = tuple ? PyTuple_GET_ITEM(o, i) : PyList_GET_ITEM(o, i);
      if (!is_array_subtype(item) || find_block(item)) continue;
      OwnedRef out = check(tuple ? PyTuple_New(n) : PyList_New(n));
      for (Py_ssize_t j = 0; j < n; ++j) {
        OwnedRef e =
            plainify(OwnedRef::borrow(tuple ? PyTuple_GET_ITEM(o, j) : PyList_GET_ITEM(o, j)));
        if (tuple)
          PyTuple_SET_ITEM(out.get(), j, e.release());
        else
          PyList_SET_ITEM(out.get(), j, e.release());
      }
      return out;
    }
    return obj;
  }
  if (!is_array_subtype(o) || find_block(o)) return obj;
  return check(PyArray_View(reinterpret_cast<PyArrayObject*>(o), nullptr, &PyArray_Type));
}

void check_shareable(PyArray_Descr* d) {
  if (PyDataType_REFCHK(d)) {
    PyErr_Format(PyExc_TypeError,
                 "pyarraypool cannot share arrays of dtype %R: they hold pointers to Python "
                 "objects, which mean nothing in another process",
                 reinterpret_cast<PyObject*>(d));
    throw PyErrSet{};
  }
  if (!PyDataType_ISLEGACY(d)) {
    PyErr_Format(PyExc_TypeError,
                 "pyarraypool cannot share arrays of dtype %R: its items may point outside "
                 "the array",
                 reinterpret_cast<PyObject*>(d));
    throw PyErrSet{};
  }
}

// A TransferableArray on `data` (inside `block`'s payload), with numpy's
// array `flags` (NPY_ARRAY_WRITEABLE or not, NPY_ARRAY_F_CONTIGUOUS for a new
// Fortran-order array). Steals `descr`.
// `type`: TransferableArray, or a plain ndarray for auto mode's private
// copies.
OwnedRef new_pool_array(PyArray_Descr* descr, int nd, const npy_intp* dims, const npy_intp* strides,
                        unsigned char* data, PyObject* block, int flags,
                        PyTypeObject* type = array_type) {
  OwnedRef arr = check(PyArray_NewFromDescr(type, descr, nd, const_cast<npy_intp*>(dims),
                                            const_cast<npy_intp*>(strides), data, flags, nullptr));
  // PyArray_SetBaseObject steals its argument, even when it fails.
  Py_INCREF(block);
  check_status(PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(arr.get()), block));
  return arr;
}

uint64_t checked_nbytes(PyArray_Descr* descr, int nd, const npy_intp* dims) {
  uint64_t n = static_cast<uint64_t>(PyDataType_ELSIZE(descr));
  for (int i = 0; i < nd; ++i) {
    if (dims[i] < 0) raise(PyExc_ValueError, "negative dimensions are not allowed");
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(dims[i]), &n))
      raise(PyExc_ValueError, "array is too big");
  }
  return n;
}

// numpy's shape argument: an integer or a sequence of integers.
int parse_shape(PyObject* obj, npy_intp* dims) {
  if (PyIndex_Check(obj)) {
    dims[0] = PyNumber_AsSsize_t(obj, PyExc_ValueError);
    if (dims[0] == -1 && PyErr_Occurred()) throw PyErrSet{};
    return 1;
  }
  OwnedRef seq = check(PySequence_Fast(obj, "shape must be an integer or a sequence of integers"));
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  if (n > static_cast<Py_ssize_t>(NPY_MAXDIMS)) raise(PyExc_ValueError, "too many dimensions");
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq.get(), i);
    if (!PyIndex_Check(item)) raise(PyExc_TypeError, "shape entries must be integers");
    dims[i] = PyNumber_AsSsize_t(item, PyExc_ValueError);
    if (dims[i] == -1 && PyErr_Occurred()) throw PyErrSet{};
  }
  return static_cast<int>(n);
}

void copy_bytes(void* dst, const void* src, uint64_t n) {
  if (n >= kReleaseGilBytes)
    without_gil([&] { std::memcpy(dst, src, n); });
  else
    std::memcpy(dst, src, n);
}

// Allocates a block for an array of `descr` and `dims`, and the array on it.
OwnedRef allocate_array(PyArray_Descr* descr, int nd, const npy_intp* dims, bool fortran,
                        bool transfer_required, uint64_t* nbytes_out) {
  check_shareable(descr);
  uint64_t nbytes = checked_nbytes(descr, nd, dims);
  ProcessPool& pp = ProcessPool::get();
  pap::Block b = pp.allocate(nbytes, transfer_required ? pap::kFlagTransferRequired : 0u);
  OwnedRef block = check(pp.block_object(b, false));
  Py_INCREF(descr);
  *nbytes_out = nbytes;
  return new_pool_array(descr, nd, dims, nullptr, b.payload, block.get(),
                        NPY_ARRAY_WRITEABLE | (fortran ? NPY_ARRAY_F_CONTIGUOUS : 0));
}

// --- dtypes in handles ---------------------------------------------------
//
// Pickling a numpy dtype object costs more than the rest of a handle round
// trip together. A built-in dtype without fields, subarray or metadata is
// exactly described by its `.str` ('<f8', '>i4', '|S5', '<M8[25us]'), which
// pickles as a short string and is rebuilt from a small cache. Other dtypes
// travel as dtype objects, pickled by numpy as in a plain pickle of the
// array: a structured dtype keeps its titles, offsets and alignment, and a
// user-defined dtype (ml_dtypes.bfloat16, whose `.str` is only '<V2') its
// scalar type.

// Whether `.str` names `d` exactly (see above).
bool described_by_str(PyArray_Descr* d) {
  return d->type_num < NPY_NTYPES_LEGACY && !PyDataType_HASFIELDS(d) &&
         !PyDataType_HASSUBARRAY(d) && PyDataType_METADATA(d) == nullptr;
}

OwnedRef dtype_for_pickle(PyArray_Descr* d) {
  // `.str` builds a new string on every call; remember the last few. The
  // cache holds its dtypes, so an address in it always means that dtype.
  struct Entry {
    PyObject* descr;
    PyObject* str;
  };
  static Entry cache[16] = {};
  Entry& e = cache[(reinterpret_cast<uintptr_t>(d) >> 4) % 16];
  if (e.descr == reinterpret_cast<PyObject*>(d)) return OwnedRef::borrow(e.str);
  // No pool array should have a dtype the loader refuses (allocation checks
  // it), but should a view reinterpret its bytes as one, say so now, with a
  // TypeError, rather than make a pickle that cannot load.
  check_shareable(d);
  if (!described_by_str(d)) return OwnedRef::borrow(reinterpret_cast<PyObject*>(d));
  OwnedRef str = check(PyObject_GetAttrString(reinterpret_cast<PyObject*>(d), "str"));
  Py_XDECREF(e.descr);
  Py_XDECREF(e.str);
  e.descr = Py_NewRef(reinterpret_cast<PyObject*>(d));
  e.str = Py_NewRef(str.get());
  return str;
}

// New reference to the dtype a handle's dtype argument names.
OwnedRef dtype_from_pickle(PyObject* arg) {
  if (PyArray_DescrCheck(arg)) return OwnedRef::borrow(arg);
  if (!PyUnicode_Check(arg)) raise(exceptions().invalid_handle, "handle dtype is not a dtype");
  static PyObject* cache = PyDict_New();  // dtype string -> dtype, for the process
  if (!cache) throw PyErrSet{};
  if (PyObject* hit = PyDict_GetItemWithError(cache, arg)) return OwnedRef::borrow(hit);
  if (PyErr_Occurred()) throw PyErrSet{};
  PyArray_Descr* d = nullptr;
  if (!PyArray_DescrConverter(arg, &d)) {
    PyErr_Clear();
    raise(exceptions().invalid_handle, "handle dtype string is not a numpy dtype");
  }
  OwnedRef descr = OwnedRef::steal(reinterpret_cast<PyObject*>(d));
  if (PyDict_GET_SIZE(cache) < 1024) check_status(PyDict_SetItem(cache, arg, descr.get()));
  return descr;
}

// --- methods -------------------------------------------------------------

// What pickle stores for a handle: (_rebuild, (handle bytes, dtype)).
OwnedRef handle_reduce_value(const pap::Handle& h, PyArray_Descr* descr) {
  OwnedRef handle =
      check(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(pap::encoded_size(h))));
  pap::encode_handle_into(h, reinterpret_cast<unsigned char*>(PyBytes_AS_STRING(handle.get())));
  OwnedRef dtype = dtype_for_pickle(descr);
  OwnedRef args = check(PyTuple_Pack(2, handle.get(), dtype.get()));
  return check(PyTuple_Pack(2, rebuild_function, args.get()));
}

OwnedRef reduce_by_value(PyObject* self, PyObject* protocol) {
  OwnedRef plain =
      check(PyArray_View(reinterpret_cast<PyArrayObject*>(self), nullptr, &PyArray_Type));
  if (protocol) return check(PyObject_CallMethod(plain.get(), "__reduce_ex__", "O", protocol));
  return check(PyObject_CallMethod(plain.get(), "__reduce__", nullptr));
}

OwnedRef reduce_impl(PyObject* self, PyObject* protocol) {
  auto* arr = reinterpret_cast<PyArrayObject*>(self);
  BlockObject* b = find_block(self);
  if (!b) return reduce_by_value(self, protocol);
  ProcessPool& pp = ProcessPool::get();
  pap::Handle h;
  pap::Pool& pool = pp.pool();
  h.pool = pool.id();
  h.instance = pool.instance();
  h.ref = b->ref;
  h.generation = b->generation;
  h.flags = (b->flags & pap::kFlagTransferRequired) ? pap::kHandleFlagTransferRequired : 0;
  // A view given out read-only stays read-only in the receiver.
  if (!PyArray_ISWRITEABLE(arr)) h.flags |= pap::kHandleFlagReadOnly;
  auto* data = reinterpret_cast<unsigned char*>(PyArray_BYTES(arr));
  // An empty view touches no bytes, and numpy may leave its pointer past
  // the end of an empty block: any offset inside the block serves.
  h.view_offset = PyArray_SIZE(arr) == 0 ? 0 : static_cast<uint64_t>(data - b->payload);
  h.itemsize = static_cast<uint64_t>(PyArray_ITEMSIZE(arr));
  h.ndim = static_cast<uint32_t>(PyArray_NDIM(arr));
  for (uint32_t i = 0; i < h.ndim; ++i) {
    h.shape[i] = PyArray_DIMS(arr)[i];
    h.strides[i] = PyArray_STRIDES(arr)[i];
  }
  uint64_t lo, hi;
  // An array built on the block's memory by other means (np.frombuffer,
  // ndarray(buffer=...)) may point elsewhere: only what lies inside travels
  // by handle.
  if ((PyArray_SIZE(arr) != 0 && data < b->payload) || !pap::view_extent(h, &lo, &hi) ||
      hi > b->capacity)
    return reduce_by_value(self, protocol);
  b->shared = true;  // from now on another process may hold it
  if (h.flags & pap::kHandleFlagTransferRequired) pp.add_pending(b->ref, b->generation);
  return handle_reduce_value(h, PyArray_DESCR(arr));
}

PyObject* array_reduce(PyObject* self, PyObject*) {
  return boundary<PyObject*>(nullptr, [&] { return reduce_impl(self, nullptr).release(); });
}

PyObject* array_reduce_ex(PyObject* self, PyObject* protocol) {
  return boundary<PyObject*>(nullptr, [&] { return reduce_impl(self, protocol).release(); });
}

PyObject* array_wrap(PyObject* self, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&] {
    static const char* kw[] = {"array", "context", "return_scalar", nullptr};
    PyObject *arr, *context = nullptr;
    int return_scalar = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Op:__array_wrap__", const_cast<char**>(kw),
                                     &arr, &context, &return_scalar))
      throw PyErrSet{};
    (void)self;
    (void)context;
    // NumPy 2 says when it wants a scalar; NumPy 1.x turns 0-d results of
    // plain ndarrays into scalars itself, but not those of a subclass's wrap.
    static const bool numpy1 = PyArray_GetNDArrayCFeatureVersion() < NPY_2_0_API_VERSION;
    if (numpy1 && PyArray_Check(arr) && PyArray_NDIM(reinterpret_cast<PyArrayObject*>(arr)) == 0 &&
        !find_block(arr))
      return_scalar = 1;
    if (return_scalar && PyArray_Check(arr) &&
        PyArray_NDIM(reinterpret_cast<PyArrayObject*>(arr)) == 0) {
      Py_INCREF(arr);
      return PyArray_Return(reinterpret_cast<PyArrayObject*>(arr));  // steals
    }
    // Some methods (squeeze) build their view as a plain ndarray and hand it
    // here to be wrapped: a view of pool memory is a pool array, so that it
    // still travels by handle (contract point 3).
    if (PyArray_CheckExact(arr) && find_block(arr))
      return PyArray_View(reinterpret_cast<PyArrayObject*>(arr), nullptr, array_type);
    return plainify(OwnedRef::borrow(arr)).release();
  });
}

PyObject* ndarray_attr(const char* name) {
  return PyObject_GetAttrString(reinterpret_cast<PyObject*>(&PyArray_Type), name);
}

// Calls ndarray's own (unbound) attribute `name` with self prepended to
// `args`, and hands back a plain ndarray when the result does not live in the
// pool. `cache` keeps the looked-up attribute for the process.
OwnedRef call_ndarray(PyObject*& cache, const char* name, PyObject* self, PyObject* args,
                      PyObject* kwargs) {
  if (!cache) {
    cache = ndarray_attr(name);
    if (!cache) throw PyErrSet{};
  }
  Py_ssize_t n = PyTuple_GET_SIZE(args);
  OwnedRef full = check(PyTuple_New(n + 1));
  PyTuple_SET_ITEM(full.get(), 0, Py_NewRef(self));
  for (Py_ssize_t i = 0; i < n; ++i)
    PyTuple_SET_ITEM(full.get(), i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
  return plainify(check(PyObject_Call(cache, full.get(), kwargs)));
}

PyObject* array_function(PyObject* self, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&] {
    static PyObject* base_impl = nullptr;
    return call_ndarray(base_impl, "__array_function__", self, args, kwargs).release();
  });
}

// ndarray methods that may return a new array not in the pool: call
// ndarray's method and hand back a plain ndarray when that is what it made.
template <const char* Name>
PyObject* plain_method(PyObject* self, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&] {
    static PyObject* method = nullptr;
    return call_ndarray(method, Name, self, args, kwargs).release();
  });
}

// ndarray.resize: a pool array never owns its memory, so numpy refuses any
// change of size with "it does not own its data", which tells a user nothing
// they can act on. Same call, numpy's ValueError, in words that say why and
// what to do instead; numpy's other errors (and a resize that keeps the size,
// a reshape in place) pass through.
PyObject* array_resize(PyObject* self, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    static PyObject* method = nullptr;
    try {
      return call_ndarray(method, "resize", self, args, kwargs).release();
    } catch (const PyErrSet&) {
      if (!PyErr_ExceptionMatches(PyExc_ValueError)) throw;
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyErr_NormalizeException(&type, &value, &tb);
      PyObject* text = value ? PyObject_Str(value) : nullptr;
      const char* said = text ? PyUnicode_AsUTF8(text) : nullptr;
      const bool not_owner = said && std::strstr(said, "does not own its data");
      Py_XDECREF(text);
      PyErr_Clear();  // from str() of numpy's error, if it failed
      if (!not_owner) {
        PyErr_Restore(type, value, tb);
        throw PyErrSet{};
      }
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
      PyErr_SetString(PyExc_ValueError,
                      "cannot resize a pool array in place: its memory is a shared-memory block "
                      "of fixed size that other processes may hold, so it can neither grow, "
                      "shrink nor move. For a new array of another shape use np.resize(x, shape) "
                      "(a plain ndarray) or pyarraypool.make_transferable(np.resize(x, shape)) "
                      "(in the pool)");
      throw PyErrSet{};
    }
  });
}

constexpr char kCopy[] = "copy";
constexpr char kDunderCopy[] = "__copy__";
constexpr char kDeepCopy[] = "__deepcopy__";
constexpr char kAstype[] = "astype";
constexpr char kFlatten[] = "flatten";
constexpr char kRavel[] = "ravel";
constexpr char kReshape[] = "reshape";
constexpr char kRepeat[] = "repeat";
constexpr char kTake[] = "take";
constexpr char kCompress[] = "compress";
constexpr char kChoose[] = "choose";
constexpr char kRound[] = "round";
constexpr char kClip[] = "clip";
constexpr char kCumsum[] = "cumsum";
constexpr char kCumprod[] = "cumprod";
constexpr char kDot[] = "dot";
constexpr char kByteswap[] = "byteswap";
constexpr char kDiagonal[] = "diagonal";
constexpr char kSqueeze[] = "squeeze";

#define PLAIN_METHOD(pyname, tmpl, doc)                                                      \
  {                                                                                          \
    pyname, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_method<tmpl>)), \
        METH_VARARGS | METH_KEYWORDS, doc                                                    \
  }

PyMethodDef array_methods[] = {
    {"__reduce__", array_reduce, METH_NOARGS,
     "Pickles a pool array as a small handle (block, offset, shape, strides, dtype)."},
    {"__reduce_ex__", array_reduce_ex, METH_O,
     "Pickles a pool array as a small handle, whatever the protocol."},
    {"__array_wrap__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(array_wrap)),
     METH_VARARGS | METH_KEYWORDS, "ufunc results not in the pool are plain ndarrays."},
    {"__array_function__",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(array_function)),
     METH_VARARGS | METH_KEYWORDS, "numpy function results not in the pool are plain ndarrays."},
    {"resize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(array_resize)),
     METH_VARARGS | METH_KEYWORDS,
     "ndarray.resize: only to the same size (a pool block cannot grow or shrink in place);\n"
     "np.resize(x, shape) or pyarraypool.make_transferable(np.resize(x, shape)) make a new "
     "array."},
    PLAIN_METHOD(kCopy, kCopy, "A copy, as a plain numpy.ndarray (not in the pool)."),
    PLAIN_METHOD(kDunderCopy, kDunderCopy, "copy.copy(): an independent plain numpy.ndarray."),
    PLAIN_METHOD(kDeepCopy, kDeepCopy, "copy.deepcopy(): an independent plain numpy.ndarray."),
    PLAIN_METHOD(kAstype, kAstype, "ndarray.astype; a new array is a plain numpy.ndarray."),
    PLAIN_METHOD(kFlatten, kFlatten, "ndarray.flatten, as a plain numpy.ndarray."),
    PLAIN_METHOD(kRavel, kRavel, "ndarray.ravel; a view stays in the pool, a copy is plain."),
    PLAIN_METHOD(kReshape, kReshape, "ndarray.reshape; a view stays in the pool, a copy is plain."),
    PLAIN_METHOD(kRepeat, kRepeat, "ndarray.repeat, as a plain numpy.ndarray."),
    PLAIN_METHOD(kTake, kTake, "ndarray.take, as a plain numpy.ndarray."),
    PLAIN_METHOD(kCompress, kCompress, "ndarray.compress, as a plain numpy.ndarray."),
    PLAIN_METHOD(kChoose, kChoose, "ndarray.choose, as a plain numpy.ndarray."),
    PLAIN_METHOD(kRound, kRound, "ndarray.round, as a plain numpy.ndarray."),
    PLAIN_METHOD(kClip, kClip, "ndarray.clip, as a plain numpy.ndarray."),
    PLAIN_METHOD(kCumsum, kCumsum, "ndarray.cumsum, as a plain numpy.ndarray."),
    PLAIN_METHOD(kCumprod, kCumprod, "ndarray.cumprod, as a plain numpy.ndarray."),
    PLAIN_METHOD(kDot, kDot, "ndarray.dot, as a plain numpy.ndarray."),
    PLAIN_METHOD(kByteswap, kByteswap, "ndarray.byteswap; in place stays in the pool."),
    PLAIN_METHOD(kDiagonal, kDiagonal, "ndarray.diagonal (a view on the pool)."),
    PLAIN_METHOD(kSqueeze, kSqueeze, "ndarray.squeeze (a view on the pool)."),
    {nullptr, nullptr, 0, nullptr},
};

PyObject* array_subscript(PyObject* self, PyObject* key) {
  return boundary<PyObject*>(nullptr, [&] {
    // Basic indexing makes views (in the pool); fancy indexing copies.
    return plainify(check(PyArray_Type.tp_as_mapping->mp_subscript(self, key))).release();
  });
}

PyObject* array_new(PyTypeObject*, PyObject*, PyObject*) {
  PyErr_SetString(PyExc_TypeError,
                  "TransferableArray cannot be created directly: use pyarraypool.make_transferable,"
                  " empty, zeros, empty_like or zeros_like");
  return nullptr;
}

const char* kArrayDoc =
    "A numpy.ndarray whose memory is a block of the pyarraypool shared-memory pool.\n\n"
    "Pickling it (to another process) carries a small handle instead of the data:\n"
    "80 bytes plus 16 per dimension, whatever the array's size. The receiver sees\n"
    "the same memory, so writes in any process are visible in all (an array that is\n"
    "not writeable arrives read-only). The handle loads only while its pool lives:\n"
    "to keep the data, pickle a copy (x.copy()) or save it with np.save. Views of it\n"
    "(slices, transposes, basic indexing) are TransferableArrays too and travel as\n"
    "views. Results that do not live in the pool (copies, copy.copy and\n"
    "copy.deepcopy, ufunc results, reductions, fancy indexing) are plain\n"
    "numpy.ndarray and pickle by value.\n\n"
    "It cannot be instantiated directly: make one with make_transferable, empty,\n"
    "zeros, empty_like or zeros_like. The block lives while any process holds an\n"
    "array on it, or a pickle of it made with transfer_required=True has not been\n"
    "loaded yet.";

PyType_Slot array_slots[] = {
    {Py_tp_methods, array_methods},
    {Py_mp_subscript, reinterpret_cast<void*>(array_subscript)},
    {Py_tp_new, reinterpret_cast<void*>(array_new)},
    {Py_tp_doc, const_cast<char*>(kArrayDoc)},
    {0, nullptr},
};

PyType_Spec array_spec = {
    "pyarraypool.TransferableArray",
    0,  // inherit ndarray's size: no fields of our own
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    array_slots,
};

}  // namespace

int add_array_type(PyObject* module) {
  PyObject* t =
      PyType_FromModuleAndSpec(module, &array_spec, reinterpret_cast<PyObject*>(&PyArray_Type));
  if (!t) return -1;
  array_type = reinterpret_cast<PyTypeObject*>(t);  // kept for the life of the process
  return PyModule_AddObjectRef(module, "TransferableArray", t);
}

// --- module functions ----------------------------------------------------

PyObject* make_transferable(PyObject*, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    static const char* kw[] = {"arr", "transfer_required", nullptr};
    PyObject* obj;
    PyObject* flag = nullptr;  // not given: True for a new array, the block's for a pool one
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$O:make_transferable", const_cast<char**>(kw),
                                     &obj, &flag))
      throw PyErrSet{};
    int transfer_required = 1;
    if (flag) check_status(transfer_required = PyObject_IsTrue(flag));
    if (BlockObject* b = PyArray_Check(obj) ? find_block(obj) : nullptr) {
      // Already in the pool: no copy. The flag belongs to the block, which
      // other processes may share already, so it cannot change; and a copy
      // made behind the caller's back would stop their writes reaching
      // this array. A flag asked for that differs is an error.
      const bool has = (b->flags & pap::kFlagTransferRequired) != 0;
      if (flag && has != (transfer_required != 0)) {
        const char* want = transfer_required ? "True" : "False";
        PyErr_Format(PyExc_ValueError,
                     "make_transferable(x, transfer_required=%s): x already lives in the pool, "
                     "in a block made with transfer_required=%s, which cannot change (other "
                     "processes may share it); for a copy with the other setting, use "
                     "make_transferable(x.copy(), transfer_required=%s)",
                     want, has ? "True" : "False", want);
        throw PyErrSet{};
      }
      // A plain view of pool memory becomes a TransferableArray view of the
      // same bytes.
      if (is_array_subtype(obj)) return OwnedRef::borrow(obj).release();
      return PyArray_View(reinterpret_cast<PyArrayObject*>(obj), nullptr, array_type);
    }
    OwnedRef src = check(PyArray_FROM_O(obj));
    auto* s = reinterpret_cast<PyArrayObject*>(src.get());
    const int nd = PyArray_NDIM(s);
    const bool fortran = nd > 1 && PyArray_IS_F_CONTIGUOUS(s) && !PyArray_IS_C_CONTIGUOUS(s);
    uint64_t nbytes;
    OwnedRef out = allocate_array(PyArray_DESCR(s), nd, PyArray_DIMS(s), fortran,
                                  transfer_required != 0, &nbytes);
    auto* o = reinterpret_cast<PyArrayObject*>(out.get());
    if ((fortran ? PyArray_IS_F_CONTIGUOUS(s) : PyArray_IS_C_CONTIGUOUS(s))) {
      copy_bytes(PyArray_BYTES(o), PyArray_BYTES(s), nbytes);
    } else {
      check_status(PyArray_CopyInto(o, s));
    }
    return out.release();
  });
}

PyObject* empty_impl(PyObject*, PyObject* args, PyObject* kwargs) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    static const char* kw[] = {"shape", "dtype", "order", "transfer_required", "zero", nullptr};
    PyObject* shape_obj;
    PyArray_Descr* descr = nullptr;
    NPY_ORDER order = NPY_CORDER;
    int transfer_required = 1, zero = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O&O&pp:empty", const_cast<char**>(kw),
                                     &shape_obj, PyArray_DescrConverter2, &descr,
                                     PyArray_OrderConverter, &order, &transfer_required, &zero)) {
      Py_XDECREF(descr);
      throw PyErrSet{};
    }
    OwnedRef descr_ref =
        OwnedRef::steal(descr ? reinterpret_cast<PyObject*>(descr)
                              : reinterpret_cast<PyObject*>(PyArray_DescrFromType(NPY_DOUBLE)));
    npy_intp dims[pap::kMaxDims];
    int nd = parse_shape(shape_obj, dims);
    if (order != NPY_CORDER && order != NPY_FORTRANORDER)
      raise(PyExc_ValueError, "only 'C' or 'F' order is permitted");
    uint64_t nbytes;
    OwnedRef out = allocate_array(reinterpret_cast<PyArray_Descr*>(descr_ref.get()), nd, dims,
                                  order == NPY_FORTRANORDER, transfer_required != 0, &nbytes);
    if (zero) {
      void* p = PyArray_BYTES(reinterpret_cast<PyArrayObject*>(out.get()));
      if (nbytes >= kReleaseGilBytes)
        without_gil([&] { std::memset(p, 0, nbytes); });
      else
        std::memset(p, 0, nbytes);
    }
    return out.release();
  });
}

PyObject* rebuild(PyObject*, PyObject* args) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    PyObject *handle, *dtype;
    if (!PyArg_ParseTuple(args, "OO:_rebuild", &handle, &dtype)) throw PyErrSet{};
    if (!PyBytes_Check(handle)) raise(exceptions().invalid_handle, "handle is not bytes");
    OwnedRef dtype_ref = dtype_from_pickle(dtype);
    auto* descr = reinterpret_cast<PyArray_Descr*>(dtype_ref.get());
    pap::Handle h = pap::decode_handle(PyBytes_AS_STRING(handle),
                                       static_cast<size_t>(PyBytes_GET_SIZE(handle)));
    if (static_cast<uint64_t>(PyDataType_ELSIZE(descr)) != h.itemsize ||
        PyDataType_HASSUBARRAY(descr) || PyDataType_REFCHK(descr) || !PyDataType_ISLEGACY(descr))
      raise(exceptions().invalid_handle, "handle dtype does not match its item size");
    if (h.ndim > static_cast<uint32_t>(NPY_MAXDIMS))
      raise(exceptions().invalid_handle, "handle has more dimensions than numpy supports");
    uint64_t lo, hi;
    pap::view_extent(h, &lo, &hi);  // decode_handle() has checked it succeeds
    ProcessPool& pp = ProcessPool::get();
    pap::Block b = pp.attach_block(h, lo, hi);
    OwnedRef block = check(pp.block_object(b, true));
    npy_intp shape[pap::kMaxDims], strides[pap::kMaxDims];
    for (uint32_t i = 0; i < h.ndim; ++i) {
      shape[i] = static_cast<npy_intp>(h.shape[i]);
      strides[i] = static_cast<npy_intp>(h.strides[i]);
    }
    Py_INCREF(descr);
    const int flags = (h.flags & pap::kHandleFlagReadOnly) ? 0 : NPY_ARRAY_WRITEABLE;
    // Auto mode's copies arrive as what was sent: a plain ndarray.
    PyTypeObject* type = (h.flags & pap::kHandleFlagPrivate) ? &PyArray_Type : array_type;
    return new_pool_array(descr, static_cast<int>(h.ndim), shape, strides,
                          b.payload + h.view_offset, block.get(), flags, type)
        .release();
  });
}

// Auto mode (pyarraypool/_auto.py): the reduce value of a plain ndarray
// sent through a pickler that auto mode hooks. One copy into a fresh block
// that only the pickle holds (its one pending count), and a private handle:
// the receiver gets a plain ndarray that is its alone, and the sender's later
// writes to its own array never reach it. NotImplemented for a dtype the
// pool cannot hold, so that the caller pickles the array by value instead.
PyObject* auto_reduce(PyObject*, PyObject* obj) {
  return boundary<PyObject*>(nullptr, [&]() -> PyObject* {
    if (!PyArray_Check(obj)) raise(PyExc_TypeError, "_auto_reduce takes a numpy array");
    auto* src = reinterpret_cast<PyArrayObject*>(obj);
    PyArray_Descr* descr = PyArray_DESCR(src);
    const int nd = PyArray_NDIM(src);
    if (PyDataType_REFCHK(descr) || !PyDataType_ISLEGACY(descr) ||
        nd > static_cast<int>(pap::kMaxDims))
      return Py_NewRef(Py_NotImplemented);
    const bool fortran = nd > 1 && PyArray_IS_F_CONTIGUOUS(src) && !PyArray_IS_C_CONTIGUOUS(src);
    const uint64_t nbytes = checked_nbytes(descr, nd, PyArray_DIMS(src));
    ProcessPool& pp = ProcessPool::get();
    pap::Block b = pp.allocate(nbytes, pap::kFlagTransferRequired | pap::kFlagPrivate);
    // This function's hold ends with it, whatever happens; from add_pending
    // on, the pickle keeps the block.
    struct Hold {
      ProcessPool& pp;
      pap::Block b;
      ~Hold() {
        try {
          pp.release(b.ref, b.generation);
        } catch (...) {  // a release never fails for a block we hold; keep it quiet anyway
        }
      }
    } hold{pp, b};
    // An array on the block lays it out as numpy would (strides for C or
    // Fortran order); it only lives for the copy.
    Py_INCREF(descr);
    OwnedRef dst = check(PyArray_NewFromDescr(
        &PyArray_Type, descr, nd, PyArray_DIMS(src), nullptr, b.payload,
        NPY_ARRAY_WRITEABLE | (fortran ? NPY_ARRAY_F_CONTIGUOUS : 0), nullptr));
    auto* d = reinterpret_cast<PyArrayObject*>(dst.get());
    if (fortran ? PyArray_IS_F_CONTIGUOUS(src) : PyArray_IS_C_CONTIGUOUS(src))
      copy_bytes(b.payload, PyArray_BYTES(src), nbytes);
    else
      check_status(PyArray_CopyInto(d, src));
    pap::Pool& pool = pp.pool();
    pap::Handle h;
    h.pool = pool.id();
    h.instance = pool.instance();
    h.ref = b.ref;
    h.generation = b.generation;
    h.flags = pap::kHandleFlagTransferRequired | pap::kHandleFlagPrivate;
    h.itemsize = static_cast<uint64_t>(PyDataType_ELSIZE(descr));
    h.ndim = static_cast<uint32_t>(nd);
    for (int i = 0; i < nd; ++i) {
      h.shape[i] = PyArray_DIMS(d)[i];
      h.strides[i] = PyArray_STRIDES(d)[i];
    }
    OwnedRef value = handle_reduce_value(h, descr);
    pp.add_pending(b.ref, b.generation);
    return value.release();
  });
}

PyObject* block_of(PyObject*, PyObject* arr) {
  BlockObject* b = find_block(arr);
  if (!b) Py_RETURN_NONE;
  Py_INCREF(b);
  return reinterpret_cast<PyObject*>(b);
}

}  // namespace pyb
