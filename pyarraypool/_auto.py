"""Auto mode: plain numpy arrays sent to other processes go through the pool.

Unchanged code that sends ``np.ndarray`` objects through multiprocessing,
``concurrent.futures`` or joblib's loky backend sends each array of at least
``min_bytes`` as a private handle: one copy into a fresh pool block, a small
pickle on the wire, and on the other side a plain ``np.ndarray`` on that
block which only the receiver holds (``_core._auto_reduce``; the handle loads
once). Plain ``pickle``, ``joblib.dump`` and ``np.save`` still write the data.

How each pickler is reached (docs/design.md, "Auto mode"):

- multiprocessing: a reducer for exactly ``np.ndarray`` in
  ``ForkingPickler``'s extra reducers, which every Connection, Queue, Pool,
  Manager and spawn start pickles through. A dispatch table matches the exact
  type: subclasses (np.memmap, TransferableArray) and other objects are not
  touched and pay nothing.
- joblib (loky and multiprocessing backends): joblib's own array reducers,
  forward (``ArrayMemmapForwardReducer.__call__``) and backward
  (``reduce_array_memmap_backward``, replaced by a picklable object that
  carries the threshold into the workers).
- loky without joblib's reducers: ``loky.backend.reduction.register``.

joblib and loky are hooked when they are imported, through the watcher of
the top-level module ``_pyarraypool_autostart``, which also turns auto mode
on in unchanged programs when ``PYARRAYPOOL_AUTO`` is set.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

import _pyarraypool_autostart as _autostart

from . import _core
from ._settings import parse_size

__all__ = ["install", "uninstall", "installed", "DEFAULT_AUTO_MIN_BYTES"]

#: The threshold of ``install()`` and of ``PYARRAYPOOL_AUTO=1``: smaller arrays
#: go by value, where a pool block would cost more than it saves.
DEFAULT_AUTO_MIN_BYTES = 65536

ENV_AUTO = _autostart.ENV_AUTO

# The threshold in force, or None when auto mode is off. Reducers read it at
# each call: a pickler made before uninstall() then sends by value.
_min_bytes: int | None = None
_lock = threading.RLock()
# What install() did, undone in reverse order by uninstall().
_undo: list[Callable[[], None]] = []
# The originals of joblib's reducers while they are replaced (see _hook_joblib).
_joblib_original: dict[str, Any] = {}

# The protocol ForkingPickler uses (its dumps and dump default to pickle's
# default): the fallback is then exactly what multiprocessing would have sent.
_MP_PROTOCOL = pickle.DEFAULT_PROTOCOL
_MISSING = object()

_LOKY_REDUCTION_MODULES = ("joblib.externals.loky.backend.reduction", "loky.backend.reduction")
_JOBLIB_REDUCERS_MODULE = "joblib._memmapping_reducer"


def _by_pool(a: np.ndarray, limit: int | None) -> Any:
    """The pool's reduce value for `a`, or None to send it by value.

    Never raises: auto mode must not break a program that works without it,
    so a dtype the pool cannot hold, a full pool or any other pool error
    sends the array by value, with a DEBUG record on the ``pyarraypool``
    logger.
    """
    if limit is None or a.nbytes < limit:
        return None
    try:
        value = _core._auto_reduce(a)
    except Exception as exc:
        _log_by_value(a, repr(exc))
        return None
    if value is NotImplemented:
        _log_by_value(a, f"the pool cannot hold dtype {a.dtype}")
        return None
    return value


def _log_by_value(a: np.ndarray, why: str) -> None:
    import logging

    logging.getLogger("pyarraypool").debug(
        "auto mode: an array of %d bytes goes by value: %s", a.nbytes, why
    )


def _reduce_for_multiprocessing(a: np.ndarray) -> Any:
    value = _by_pool(a, _min_bytes)
    return value if value is not None else a.__reduce_ex__(_MP_PROTOCOL)


class _LokyReducer:
    """loky's reducer for np.ndarray: the pool, else what loky would have sent.

    loky pickles with cloudpickle at protocol 5, where numpy's own reduction
    hands the data over as a buffer without a copy; with another pickler
    (``LOKY_PICKLER``), at that pickler's default protocol.
    """

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def __call__(self, a: np.ndarray) -> Any:
        value = _by_pool(a, _min_bytes)
        if value is not None:
            return value
        cloudpickle = self.module.get_loky_pickler_name() in (None, "", "cloudpickle")
        return a.__reduce_ex__(pickle.HIGHEST_PROTOCOL if cloudpickle else pickle.DEFAULT_PROTOCOL)


def _joblib_forward(self: Any, a: np.ndarray) -> Any:
    """joblib's ArrayMemmapForwardReducer.__call__ (parent to workers) in auto mode.

    An array already backed by a memmap keeps joblib's way (the workers map
    the same file, no copy at all).
    """
    if type(a) is np.ndarray:
        module = _joblib_original["module"]
        if module._get_backing_memmap(a) is None:
            value = _by_pool(a, _min_bytes)
            if value is not None:
                return value
    return _joblib_original["forward"](self, a)


class _JoblibBackward:
    """joblib's backward reducer (workers to parent) in auto mode.

    joblib puts the reducer into the dict that its executor sends to the
    workers, so it is pickled: an object that carries the threshold, where a
    function would be found again by name in a worker that may not be in auto
    mode itself.
    """

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return (_JoblibBackward, (self.min_bytes,))

    def __call__(self, a: np.ndarray) -> Any:
        from joblib import _memmapping_reducer as module  # type: ignore[import-untyped]

        if type(a) is np.ndarray and module._get_backing_memmap(a) is None:
            value = _by_pool(a, self.min_bytes)
            if value is not None:
                return value
        original = _joblib_original.get("backward", module.reduce_array_memmap_backward)
        return original(a)


def _register(table: dict[Any, Any], reducer: Callable[[np.ndarray], Any]) -> None:
    """Puts `reducer` for np.ndarray in a pickler's table; uninstall() puts back what was there."""
    previous = table.get(np.ndarray, _MISSING)
    table[np.ndarray] = reducer

    def undo() -> None:
        if previous is _MISSING:
            table.pop(np.ndarray, None)
        else:
            table[np.ndarray] = previous

    _undo.append(undo)


def _hook_multiprocessing() -> None:
    from multiprocessing.reduction import ForkingPickler

    # ForkingPickler.register() writes here; each new pickler copies it.
    _register(ForkingPickler._extra_reducers, _reduce_for_multiprocessing)  # type: ignore[attr-defined]


def _hook_loky(name: str) -> None:
    module: Any = sys.modules[name]
    table = getattr(module, "_dispatch_table", None)
    if not isinstance(table, dict) or not hasattr(module, "get_loky_pickler_name"):
        _log_skip(name)
        return
    # loky.backend.reduction.register() writes here; each new pickler copies it.
    _register(table, _LokyReducer(module))


def _hook_joblib() -> None:
    module: Any = sys.modules[_JOBLIB_REDUCERS_MODULE]
    cls: Any = getattr(module, "ArrayMemmapForwardReducer", None)
    forward = vars(cls).get("__call__") if isinstance(cls, type) else None
    backward = getattr(module, "reduce_array_memmap_backward", None)
    if forward is None or backward is None or not hasattr(module, "_get_backing_memmap"):
        _log_skip(_JOBLIB_REDUCERS_MODULE)
        return
    _joblib_original.update(module=module, forward=forward, backward=backward)
    # get_memmapping_reducers reads the module's global at each call.
    cls.__call__ = _joblib_forward
    assert _min_bytes is not None  # hooked under _lock, only while installed
    module.reduce_array_memmap_backward = _JoblibBackward(_min_bytes)

    def undo() -> None:
        cls.__call__ = forward
        module.reduce_array_memmap_backward = backward
        _joblib_original.clear()

    _undo.append(undo)


def _log_skip(name: str) -> None:
    import logging

    logging.getLogger("pyarraypool").debug(
        "auto mode: %s is not as expected; its arrays go as before", name
    )


def _when_imported(name: str, hook: Callable[[], None]) -> None:
    def locked_hook() -> None:
        with _lock:
            if _min_bytes is not None:  # not uninstalled meanwhile
                hook()

    token = _autostart.when_imported((name,), locked_hook)
    _undo.append(lambda: _autostart.cancel(token))


def install(min_bytes: int | str = DEFAULT_AUTO_MIN_BYTES) -> None:
    """Turn auto mode on: plain arrays sent to other processes go through the pool.

    From now on, every plain ``numpy.ndarray`` (exactly that type) of at
    least `min_bytes` that this process sends through multiprocessing
    (``Pool`` arguments and results, ``Process`` arguments, ``Queue``,
    ``Pipe``, ``Manager``), ``concurrent.futures.ProcessPoolExecutor`` or
    joblib's loky backend is copied once into a fresh pool block and sent as
    a small handle. The receiver gets a plain ``numpy.ndarray`` on that
    block, its alone: the sender's later writes do not reach it, and the
    same pickle cannot be loaded twice. Smaller arrays, subclasses
    (``np.memmap``, :class:`TransferableArray`), dtypes the pool cannot hold,
    and any array the pool cannot take (:class:`PoolFullError`) go as
    before. ``pickle.dumps``, ``joblib.dump`` and ``np.save`` still write
    the data.

    Also sets ``PYARRAYPOOL_AUTO`` in ``os.environ``, so that processes
    started afterwards (spawn and forkserver workers, which send results
    back) are in auto mode too; forked children inherit it in memory.
    Calling it again changes the threshold.

    Parameters
    ----------
    min_bytes : int or str, optional
        The smallest array, in bytes, that goes through the pool (default
        65536). Sizes as in :func:`configure`: ``65536``, ``"64K"``, ``"1M"``.

    Raises
    ------
    TypeError
        `min_bytes` is not an int or a string.
    ValueError
        `min_bytes` cannot be read as a positive size.
    """
    global _min_bytes
    limit = parse_size(min_bytes)
    with _lock:
        first = _min_bytes is None
        _min_bytes = limit
        if first:
            _hook_multiprocessing()
            _when_imported(_JOBLIB_REDUCERS_MODULE, _hook_joblib)
            for name in _LOKY_REDUCTION_MODULES:
                _when_imported(name, lambda name=name: _hook_loky(name))  # type: ignore[misc]
        else:
            module = _joblib_original.get("module")
            if module is not None:  # the backward reducer carries the threshold
                module.reduce_array_memmap_backward = _JoblibBackward(limit)
        os.environ[ENV_AUTO] = str(limit)


def uninstall() -> None:
    """Turn auto mode off: every pickler sends arrays as it did before :func:`install`.

    Removes ``PYARRAYPOOL_AUTO`` from ``os.environ``. Arrays already received
    stay in the pool until dropped. A no-op when auto mode is off.
    """
    global _min_bytes
    with _lock:
        _min_bytes = None
        while _undo:
            _undo.pop()()
        os.environ.pop(ENV_AUTO, None)


def installed() -> int | None:
    """The threshold of auto mode in bytes, or ``None`` when it is off."""
    return _min_bytes


def parse_auto_value(raw: str) -> int | None:
    """The threshold that a ``PYARRAYPOOL_AUTO`` value asks for, or None for off.

    A size (``65536``, ``"64K"``, ``"1M"``); ``1``, ``on``, ``true``, ``yes``
    for the default threshold; ``0``, ``off``, ``false``, ``no`` or empty for
    off. Anything else is a ``ValueError``.
    """
    word = raw.strip().lower()
    if word in _autostart.OFF_VALUES:
        return None
    if word in _autostart.ON_VALUES:
        return DEFAULT_AUTO_MIN_BYTES
    return parse_size(raw)


def install_from_env() -> None:
    """Turn auto mode on if ``PYARRAYPOOL_AUTO`` asks for it (at ``import pyarraypool``).

    Never raises: a value that cannot be read leaves auto mode off with one
    RuntimeWarning, and is taken out of ``os.environ`` so that the processes
    this one starts do not warn again.
    """
    raw = os.environ.get(ENV_AUTO)
    if raw is None:
        return
    try:
        limit = parse_auto_value(raw)
    except (TypeError, ValueError):
        why = "is not a size (65536, '64K', '1M'), '1' (the default threshold) or '0' (off)"
    else:
        if limit is None:
            return
        try:
            install(limit)
            return
        except Exception as exc:  # import pyarraypool must not fail because of auto mode
            uninstall()
            why = f"could not be installed ({exc!r})"
    os.environ.pop(ENV_AUTO, None)
    warnings.warn(f"{ENV_AUTO}={raw!r} {why}: auto mode stays off", RuntimeWarning, stacklevel=3)
