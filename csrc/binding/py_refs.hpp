// Ownership of Python references, in types.
//
// OwnedRef holds a strong reference and releases it when it goes out of
// scope. It is built either by stealing a reference a C-API call returned
// (OwnedRef::steal, the common case: "new reference" in the API docs) or by
// taking a new one on a borrowed object (OwnedRef::borrow). Plain PyObject*
// in this code is always borrowed.
#pragma once

#include "binding/numpy_api.hpp"

namespace pyb {

class OwnedRef {
 public:
  OwnedRef() = default;
  static OwnedRef steal(PyObject* o) { return OwnedRef(o); }
  static OwnedRef borrow(PyObject* o) {
    Py_XINCREF(o);
    return OwnedRef(o);
  }
  OwnedRef(OwnedRef&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  OwnedRef& operator=(OwnedRef&& o) noexcept {
    if (this != &o) {
      Py_XDECREF(p_);
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  OwnedRef(const OwnedRef&) = delete;
  OwnedRef& operator=(const OwnedRef&) = delete;
  ~OwnedRef() { Py_XDECREF(p_); }

  PyObject* get() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }
  // Hands the reference to the caller (e.g. to return it to CPython).
  PyObject* release() {
    PyObject* p = p_;
    p_ = nullptr;
    return p;
  }

 private:
  explicit OwnedRef(PyObject* p) : p_(p) {}
  PyObject* p_ = nullptr;
};

}  // namespace pyb
