// Records on the "pyarraypool" logger for what maintenance reclaimed.
//
// The core queues PoolEvents (core/pool_events.hpp) as it reclaims what a
// dead process held or drops pickles that were never loaded; after any call
// that may have run maintenance, the binding logs one record per event: a
// warning, or DEBUG for a routine one (a process of this program reclaimed).
#pragma once

#include <string>

#include "binding/numpy_api.hpp"
#include "core/pool.hpp"

namespace pyb {

// Drains `p`'s events and logs them. Call with the GIL held. Safe in a
// dealloc or with an exception set: the pending exception is kept, and a
// failure to log is swallowed (an event is not worth an error of its own).
void log_pool_events(pap::Pool& p) noexcept;

// A DEBUG record on the "pyarraypool" logger, with the same care (GIL held).
void log_debug(const std::string& message) noexcept;

// The cheap check to put after calls that may run maintenance.
inline void report_pool_events(pap::Pool* p) noexcept {
  if (p && p->has_events()) log_pool_events(*p);
}

}  // namespace pyb
