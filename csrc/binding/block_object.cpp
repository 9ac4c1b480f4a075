// The `_Block` type: one process's hold on one pool block (see
// process_pool.hpp). Its deallocation is where a hold ends.

#include <string>

#include "binding/module_types.hpp"
#include "binding/process_pool.hpp"

namespace pyb {
namespace {

void block_dealloc(PyObject* self) {
  auto* b = reinterpret_cast<BlockObject*>(self);
  ProcessPool& pp = ProcessPool::get();
  pp.forget(b);
  // A dealloc may run while an exception is being raised; keep it intact.
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  try {
    pp.release(*b);
  } catch (...) {
    set_error_from_current_exception();
    // Not `self`: its refcount is 0, and a reference taken and dropped by
    // the report would deallocate it again.
    PyErr_WriteUnraisable(reinterpret_cast<PyObject*>(Py_TYPE(self)));
  }
  PyErr_Restore(type, value, tb);
  PyTypeObject* tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyObject* block_repr(PyObject* self) {
  auto* b = reinterpret_cast<BlockObject*>(self);
  return PyUnicode_FromFormat("<pyarraypool block segment=%u offset=%llu capacity=%llu gen=%llu>",
                              b->ref.seg(), static_cast<unsigned long long>(b->ref.off()),
                              static_cast<unsigned long long>(b->capacity),
                              static_cast<unsigned long long>(b->generation));
}

PyObject* get_segment(PyObject* self, void*) {
  return PyLong_FromUnsignedLong(reinterpret_cast<BlockObject*>(self)->ref.seg());
}
PyObject* get_offset(PyObject* self, void*) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<BlockObject*>(self)->ref.off());
}
PyObject* get_generation(PyObject* self, void*) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<BlockObject*>(self)->generation);
}
PyObject* get_capacity(PyObject* self, void*) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<BlockObject*>(self)->capacity);
}
PyObject* get_address(PyObject* self, void*) {
  return PyLong_FromVoidPtr(reinterpret_cast<BlockObject*>(self)->payload);
}
PyObject* get_transfer_required(PyObject* self, void*) {
  return PyBool_FromLong(reinterpret_cast<BlockObject*>(self)->flags & pap::kFlagTransferRequired);
}

PyGetSetDef block_getset[] = {
    {"segment", get_segment, nullptr, "index of the segment holding the block", nullptr},
    {"offset", get_offset, nullptr, "byte offset of the block header in its segment", nullptr},
    {"generation", get_generation, nullptr, "allocation number, unique in the pool", nullptr},
    {"capacity", get_capacity, nullptr, "usable bytes of the block", nullptr},
    {"address", get_address, nullptr, "address of the payload in this process", nullptr},
    {"transfer_required", get_transfer_required, nullptr,
     "whether pickles keep the block alive until loaded", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyType_Slot block_slots[] = {
    {Py_tp_dealloc, reinterpret_cast<void*>(block_dealloc)},
    {Py_tp_repr, reinterpret_cast<void*>(block_repr)},
    {Py_tp_getset, block_getset},
    {Py_tp_doc,
     const_cast<char*>("This process's hold on one block of the pool (an array's base).")},
    {0, nullptr},
};

PyType_Spec block_spec = {
    "pyarraypool._core._Block",
    sizeof(BlockObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    block_slots,
};

}  // namespace

int add_block_type(PyObject* module) {
  PyObject* t = PyType_FromModuleAndSpec(module, &block_spec, nullptr);
  if (!t) return -1;
  block_type = reinterpret_cast<PyTypeObject*>(t);  // kept for the life of the process
  return PyModule_AddObjectRef(module, "_Block", t);
}

}  // namespace pyb
