#include "binding/pool_logging.hpp"

#include <string>
#include <vector>

#include "binding/py_errors.hpp"
#include "core/pool_events.hpp"

namespace pyb {
namespace {

constexpr double kNs = 1e9;

// The event as a dict, for handlers that want the numbers (the record's
// `pyarraypool_event` attribute).
OwnedRef event_dict(const pap::PoolEvent& e) {
  const bool reclaim = e.kind == pap::PoolEvent::Kind::kReclaim;
  return check(Py_BuildValue(
      "{s:s,s:i,s:O,s:O,s:O,s:K,s:K,s:K,s:K,s:d,s:d}", "kind", reclaim ? "reclaim" : "expiry",
      "pid", e.pid, "reserved", e.reserved ? Py_True : Py_False, "same_program",
      e.same_program ? Py_True : Py_False, "held_lock", e.held_lock ? Py_True : Py_False, "blocks",
      static_cast<unsigned long long>(e.blocks), "bytes", static_cast<unsigned long long>(e.bytes),
      "freed_bytes", static_cast<unsigned long long>(e.freed_bytes), "pickles",
      static_cast<unsigned long long>(e.pickles), "age", static_cast<double>(e.age_ns) / kNs,
      "transfer_timeout", static_cast<double>(e.timeout_ns) / kNs));
}

// logger.warning(message), or logger.debug() for a routine event, with the
// event's dict (if any) as the record's `pyarraypool_event`.
void log_record(PyObject* logger, bool routine, const std::string& message, PyObject* event) {
  OwnedRef method = check(PyObject_GetAttrString(logger, routine ? "debug" : "warning"));
  OwnedRef args = check(Py_BuildValue("(s)", message.c_str()));
  OwnedRef kwargs = check(PyDict_New());
  if (event) {
    OwnedRef extra = check(Py_BuildValue("{s:O}", "pyarraypool_event", event));
    check_status(PyDict_SetItemString(kwargs.get(), "extra", extra.get()));
  }
  check(PyObject_Call(method.get(), args.get(), kwargs.get()));
}

// logging.getLogger("pyarraypool").
OwnedRef pyarraypool_logger() {
  OwnedRef logging = check(PyImport_ImportModule("logging"));
  return check(PyObject_CallMethod(logging.get(), "getLogger", "s", "pyarraypool"));
}

}  // namespace

void log_debug(const std::string& message) noexcept {
  if (is_finalizing()) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  try {
    check(PyObject_CallMethod(pyarraypool_logger().get(), "debug", "s", message.c_str()));
  } catch (...) {
    PyErr_Clear();
  }
  PyErr_Restore(type, value, traceback);
}

void log_pool_events(pap::Pool& p) noexcept {
  std::vector<pap::PoolEvent> events;
  uint64_t dropped = 0, dropped_routine = 0;
  try {
    events = p.take_events(&dropped, &dropped_routine);
  } catch (...) {
    return;
  }
  // At exit the logging machinery may be gone already; the events only
  // describe what has been done, so they may go unsaid.
  if (is_finalizing()) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  try {
    OwnedRef logger = pyarraypool_logger();
    for (const pap::PoolEvent& e : events) {
      try {
        OwnedRef d = event_dict(e);
        log_record(logger.get(), pap::routine(e), pap::describe(e), d.get());
      } catch (...) {
        PyErr_Clear();  // this one is lost; the others may still get through
      }
    }
    if (dropped)
      log_record(logger.get(), dropped == dropped_routine,
                 "pyarraypool: " + std::to_string(dropped) +
                     " more reclaim/expiry events happened at once and were not logged one by one",
                 nullptr);
  } catch (...) {
    PyErr_Clear();
  }
  PyErr_Restore(type, value, traceback);
}

}  // namespace pyb
