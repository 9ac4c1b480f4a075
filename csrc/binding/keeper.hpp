// Starting the pool's keeper (core/keeper.hpp, docs/design.md "Keeper"), and
// the keeper's own entry point.
//
// The keeper is `sys.executable` running one call of a small module,
// pyarraypool._keeper, whose init function lives in this same extension
// file (PyInit__keeper beside PyInit__core; PEP 489 allows several modules
// in one library, loaded by path with ExtensionFileLoader). Loading it runs
// no init of _core, so the keeper never imports NumPy, and there is no
// second extension to build or ship.
#pragma once

#include <sys/types.h>

#include "binding/py_refs.hpp"
#include "core/pool.hpp"

namespace pyb {

// Starts the keeper of `pool`, which this process has just created, without
// waiting for it. Call with the GIL held. Never raises: if the keeper cannot
// start, the pool works as before (if the program is killed, its files go
// at the next pool creation or `clean`), and at most a DEBUG record on the
// "pyarraypool" logger says why.
void start_keeper(const pap::Pool& pool) noexcept;

// Waits until the keeper start_keeper began spawning is spawned (the exec
// is done) and joins the thread that spawned it, if not done yet; the GIL
// is released meanwhile. Called before every fork (the os.register_at_fork
// hook): the process forks with no thread of ours. And as the process
// leaves the pool at exit: a creator that exits within milliseconds of
// making the pool, leaving it to others (or, kept for the program's root,
// to nobody attached), still leaves the pool its keeper.
void finish_keeper_start() noexcept;

}  // namespace pyb
