// The types and functions each binding file contributes to the module.
#pragma once

#include "binding/numpy_api.hpp"

namespace pyb {

// Each creates its type as a heap type of `module` and adds it; -1 on error.
int add_block_type(PyObject* module);
int add_array_type(PyObject* module);

extern PyTypeObject* array_type;    // TransferableArray
extern PyObject* rebuild_function;  // pyarraypool._core._rebuild, for __reduce__

// Module-level functions implemented next to the array type.
PyObject* make_transferable(PyObject* self, PyObject* args, PyObject* kwargs);
PyObject* empty_impl(PyObject* self, PyObject* args, PyObject* kwargs);
PyObject* rebuild(PyObject* self, PyObject* args);
PyObject* block_of(PyObject* self, PyObject* arr);
PyObject* auto_reduce(PyObject* self, PyObject* arr);

}  // namespace pyb
