// The one place that includes NumPy's C API.
//
// NumPy's API is a table of function pointers filled by import_array(). It
// lives in one symbol (PY_ARRAY_UNIQUE_SYMBOL) shared by every file of the
// extension; module.cpp defines PAP_NUMPY_IMPORT and fills it, the other
// files see it as extern. Built against NumPy 2 headers with a 1.23 target,
// one binary runs on NumPy 1.26 and 2.x.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL PAP_ARRAY_API
#ifndef PAP_NUMPY_IMPORT
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
