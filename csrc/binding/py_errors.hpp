// Errors across the C++/CPython boundary.
//
// Inside the binding, a failed C-API call (a Python error is already set)
// throws PyErrSet; core failures throw pap::CoreError. Every function that
// CPython calls runs its body through `boundary()`, which catches everything
// and turns it into a set Python error and a NULL/-1 return: no C++
// exception ever unwinds into the interpreter.
#pragma once

#include <cxxabi.h>
#include <unistd.h>

#include "binding/numpy_api.hpp"
#include "binding/py_refs.hpp"
#include "core/errors.hpp"

namespace pyb {

struct PyErrSet {};

// Throws PyErrSet if `p` is NULL; otherwise owns it.
inline OwnedRef check(PyObject* p) {
  if (!p) throw PyErrSet{};
  return OwnedRef::steal(p);
}
inline void check_status(int status) {
  if (status < 0) throw PyErrSet{};
}
[[noreturn]] inline void raise(PyObject* type, const char* msg) {
  PyErr_SetString(type, msg);
  throw PyErrSet{};
}

// The Python exception classes, created at module exec.
struct Exceptions {
  PyObject* pool_error = nullptr;
  PyObject* pool_full = nullptr;
  PyObject* stale_handle = nullptr;
  PyObject* invalid_handle = nullptr;
};
Exceptions& exceptions();

// Sets the Python error that matches the active exception (call from a
// catch block only).
void set_error_from_current_exception() noexcept;

// Runs `body` and converts any exception into a set Python error, returning
// `on_error` in that case.
template <class R, class F>
R boundary(R on_error, F&& body) noexcept {
  try {
    return body();
  } catch (...) {
    set_error_from_current_exception();
    return on_error;
  }
}

inline bool is_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Releases the GIL for a scope (system calls, waits, large copies) and takes
// it back when the scope ends, also when it ends by an exception.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  ~GilReleased() {
    // A daemon thread that takes the GIL back while the interpreter is
    // finalizing is ended by CPython with pthread_exit(), whose forced
    // unwind cannot leave this (noexcept) destructor: the process would
    // abort. Checking is_finalizing() first cannot avoid it, since
    // finalization may begin between that check and the GIL's own. So the
    // forced unwind is caught here, and the thread parks in the handler
    // (leaving it without rethrowing would abort too). The thread is
    // abandoned at exit anyway, and holds no lock of ours by now (the pool
    // lock and our mutexes are released inside the scope).
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {
      for (;;) ::pause();
    }
  }
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;

 private:
  PyThreadState* state_;
};

// Runs `f` without the GIL; `f` must not touch Python objects.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  GilReleased released;
  return f();
}

}  // namespace pyb
