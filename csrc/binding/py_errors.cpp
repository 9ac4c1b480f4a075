#include "binding/py_errors.hpp"

#include <new>

namespace pyb {

Exceptions& exceptions() {
  static Exceptions e;
  return e;
}

void set_error_from_current_exception() noexcept {
  try {
    throw;
  } catch (const PyErrSet&) {
    // Already set by the failing C-API call.
  } catch (const pap::CoreError& e) {
    const Exceptions& ex = exceptions();
    switch (e.kind()) {
      case pap::ErrorKind::kPoolFull:
        PyErr_SetString(ex.pool_full, e.what());
        break;
      case pap::ErrorKind::kStaleHandle:
        PyErr_SetString(ex.stale_handle, e.what());
        break;
      case pap::ErrorKind::kInvalidHandle:
        PyErr_SetString(ex.invalid_handle, e.what());
        break;
      case pap::ErrorKind::kOs: {
        PyObject* args = Py_BuildValue("(is)", e.error_number(), e.what());
        if (args) {
          PyErr_SetObject(PyExc_OSError, args);
          Py_DECREF(args);
        }
        break;
      }
      case pap::ErrorKind::kPool:
      default:
        PyErr_SetString(ex.pool_error, e.what());
        break;
    }
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception in pyarraypool");
  }
}

}  // namespace pyb
