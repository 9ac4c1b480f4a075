"""The Python face of the pool: allocation helpers, settings and statistics."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol, SupportsIndex, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _core, _lifecycle
from ._core import TransferableArray
from ._settings import (
    DEFAULT_DECAY,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_TRANSFER_TIMEOUT,
    default_max_bytes,
    env_settings,
    parse_decay,
    parse_size,
    parse_timeout,
)

__all__ = ["empty", "zeros", "empty_like", "zeros_like", "configure", "stats", "PoolStats"]

_ShapeLike = SupportsIndex | Sequence[SupportsIndex]
_OrderCF = Literal["C", "F"]
_OrderKACF = Literal["K", "A", "C", "F"]
_ShapeT = TypeVar("_ShapeT", bound=tuple[int, ...])
_DTypeT = TypeVar("_DTypeT", bound="np.dtype[Any]")
_ScalarT = TypeVar("_ScalarT", bound=np.generic)
_AnyShape = tuple[Any, ...]


# The types callers see, so that shapes and dtypes flow as through numpy's own
# empty/zeros: `empty(3, np.float32)` is a TransferableArray[tuple[int],
# dtype[float32]], `zeros((2, 3))` a TransferableArray[tuple[int, int],
# dtype[float64]]. Written once as protocols, which `_typed` gives to the plain
# functions below (the same function objects at run time), rather than as two
# copies of the same overloads on each pair of functions.
class _Allocator(Protocol):
    @overload
    def __call__(
        self, shape: SupportsIndex, dtype: None = None, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[tuple[int], np.dtype[np.float64]]: ...
    @overload
    def __call__(
        self, shape: SupportsIndex, dtype: type[_ScalarT], order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[tuple[int], np.dtype[_ScalarT]]: ...
    @overload
    def __call__(
        self, shape: SupportsIndex, dtype: _DTypeT, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[tuple[int], _DTypeT]: ...
    @overload
    def __call__(
        self, shape: SupportsIndex, dtype: DTypeLike, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[tuple[int], np.dtype[Any]]: ...
    @overload
    def __call__(
        self, shape: _ShapeT, dtype: None = None, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_ShapeT, np.dtype[np.float64]]: ...
    @overload
    def __call__(
        self, shape: _ShapeT, dtype: type[_ScalarT], order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_ShapeT, np.dtype[_ScalarT]]: ...
    @overload
    def __call__(
        self, shape: _ShapeT, dtype: _DTypeT, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_ShapeT, _DTypeT]: ...
    @overload
    def __call__(
        self, shape: _ShapeT, dtype: DTypeLike, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_ShapeT, np.dtype[Any]]: ...
    @overload
    def __call__(
        self, shape: _ShapeLike, dtype: type[_ScalarT], order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, np.dtype[_ScalarT]]: ...
    @overload
    def __call__(
        self, shape: _ShapeLike, dtype: _DTypeT, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, _DTypeT]: ...
    @overload
    def __call__(
        self, shape: _ShapeLike, dtype: DTypeLike | None = None, order: _OrderCF = "C", *,
        like: None = None, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, np.dtype[Any]]: ...


class _LikeAllocator(Protocol):
    @overload
    def __call__(
        self, prototype: np.ndarray[_ShapeT, _DTypeT], dtype: None = None,
        order: _OrderKACF = "K", subok: bool = True, shape: None = None, *,
        transfer_required: bool = True,
    ) -> TransferableArray[_ShapeT, _DTypeT]: ...
    @overload
    def __call__(
        self, prototype: ArrayLike, dtype: type[_ScalarT], order: _OrderKACF = "K",
        subok: bool = True, shape: _ShapeLike | None = None, *, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, np.dtype[_ScalarT]]: ...
    @overload
    def __call__(
        self, prototype: ArrayLike, dtype: _DTypeT, order: _OrderKACF = "K",
        subok: bool = True, shape: _ShapeLike | None = None, *, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, _DTypeT]: ...
    @overload
    def __call__(
        self, prototype: ArrayLike, dtype: DTypeLike | None = None, order: _OrderKACF = "K",
        subok: bool = True, shape: _ShapeLike | None = None, *, transfer_required: bool = True,
    ) -> TransferableArray[_AnyShape, np.dtype[Any]]: ...


class _AllocatorImpl(Protocol):
    def __call__(
        self, shape: _ShapeLike, dtype: DTypeLike | None = ..., order: _OrderCF = ..., *,
        like: None = ..., transfer_required: bool = ...,
    ) -> TransferableArray[Any, Any]: ...


class _LikeAllocatorImpl(Protocol):
    def __call__(
        self, prototype: ArrayLike, dtype: DTypeLike | None = ..., order: _OrderKACF = ...,
        subok: bool = ..., shape: _ShapeLike | None = ..., *, transfer_required: bool = ...,
    ) -> TransferableArray[Any, Any]: ...


@overload
def _typed(impl: _AllocatorImpl) -> _Allocator: ...
@overload
def _typed(impl: _LikeAllocatorImpl) -> _LikeAllocator: ...
def _typed(impl: Any) -> Any:
    """Gives `impl` its overloaded type (above); returns it unchanged."""
    return impl


@_typed
def empty(
    shape: _ShapeLike,
    dtype: DTypeLike | None = float,
    order: _OrderCF = "C",
    *,
    like: None = None,
    transfer_required: bool = True,
) -> TransferableArray[Any, Any]:
    """Like :func:`numpy.empty`, but allocated in the shared-memory pool.

    No copy and no initialisation: the contents are undefined. A worker can
    fill the array in place and return it; the receiver gets a handle to the
    same memory.

    Parameters
    ----------
    shape : int or sequence of ints
        The shape of the new array.
    dtype : data-type, optional
        Any numpy dtype without Python objects (default ``float64``).
    order : {'C', 'F'}, optional
        Row-major (C) or column-major (Fortran) memory layout.
    like : None
        Accepted for numpy compatibility; anything but ``None`` is a
        ``TypeError``.
    transfer_required : bool, optional
        If true (the default), every pickle of the array keeps its block alive
        until some process loads it, so a worker can return the array and
        exit. If false, the block is freed as soon as no process holds it, and
        loading a late pickle raises :class:`StaleHandleError`.

    Returns
    -------
    TransferableArray
        A new array whose memory is a block of the shared-memory pool.

    Raises
    ------
    PoolFullError
        The pool cannot grow to hold the array under ``max_bytes``, or
        ``/dev/shm`` is full.
    TypeError
        The dtype holds Python objects, or ``like`` is given.
    ValueError
        A negative dimension, an order other than 'C' or 'F', or an array too
        large to describe.
    """
    if like is not None:
        raise TypeError("pyarraypool.empty does not support like=")
    return _core._empty(shape, dtype, order, transfer_required)


@_typed
def zeros(
    shape: _ShapeLike,
    dtype: DTypeLike | None = float,
    order: _OrderCF = "C",
    *,
    like: None = None,
    transfer_required: bool = True,
) -> TransferableArray[Any, Any]:
    """Like :func:`numpy.zeros`, but allocated in the shared-memory pool.

    The same as :func:`empty`, with every byte set to zero: the parameters,
    the result and the exceptions are those of :func:`empty`.
    """
    if like is not None:
        raise TypeError("pyarraypool.zeros does not support like=")
    return _core._empty(shape, dtype, order, transfer_required, True)


def _like_args(
    prototype: ArrayLike, dtype: DTypeLike | None, order: str, shape: _ShapeLike | None
) -> tuple[Any, Any, str]:
    proto = prototype if isinstance(prototype, np.ndarray) else np.asarray(prototype)
    if order in ("K", "A"):
        fortran = proto.ndim > 1 and proto.flags.f_contiguous and not proto.flags.c_contiguous
        order = "F" if fortran else "C"
    shp = proto.shape if shape is None else shape
    return shp, (proto.dtype if dtype is None else dtype), order


@_typed
def empty_like(
    prototype: ArrayLike,
    dtype: DTypeLike | None = None,
    order: _OrderKACF = "K",
    subok: bool = True,
    shape: _ShapeLike | None = None,
    *,
    transfer_required: bool = True,
) -> TransferableArray[Any, Any]:
    """Like :func:`numpy.empty_like`, but allocated in the shared-memory pool.

    The contents are undefined.

    Parameters
    ----------
    prototype : array_like
        The array whose shape, dtype and memory layout the result takes.
    dtype : data-type, optional
        Overrides the prototype's dtype.
    order : {'K', 'A', 'C', 'F'}, optional
        'K' and 'A' keep Fortran order for a Fortran-contiguous prototype
        and use C order otherwise.
    subok : bool, optional
        Accepted for numpy compatibility: the result is always a
        TransferableArray.
    shape : int or sequence of ints, optional
        Overrides the prototype's shape.
    transfer_required : bool, optional
        As for :func:`empty`: whether pickles keep the block alive until
        loaded (default true).

    Returns
    -------
    TransferableArray
        A new array in the pool.

    Raises
    ------
    PoolFullError
        The pool cannot grow to hold the array.
    TypeError
        The dtype holds Python objects.
    ValueError
        A negative dimension or an unknown order.
    """
    shp, dt, cf = _like_args(prototype, dtype, order, shape)
    return _core._empty(shp, dt, cf, transfer_required)


@_typed
def zeros_like(
    prototype: ArrayLike,
    dtype: DTypeLike | None = None,
    order: _OrderKACF = "K",
    subok: bool = True,
    shape: _ShapeLike | None = None,
    *,
    transfer_required: bool = True,
) -> TransferableArray[Any, Any]:
    """Like :func:`numpy.zeros_like`, but allocated in the shared-memory pool.

    The same as :func:`empty_like`, with every byte set to zero: the
    parameters, the result and the exceptions are those of :func:`empty_like`.
    """
    shp, dt, cf = _like_args(prototype, dtype, order, shape)
    return _core._empty(shp, dt, cf, transfer_required, True)


# The PYARRAYPOOL_* variables that could not be read at import, by setting:
# a message naming the variable and its value. The first use of the pool
# raises it as a ValueError (ProcessPool::pool), and so does configure()
# unless it gives that setting; the import and the command line work.
_env_problems: dict[str, str] = {}


def set_env_problems(problems: dict[str, str]) -> None:
    _env_problems.clear()
    _env_problems.update(problems)
    _core._settings_error("; ".join(problems.values()))


def env_problems() -> list[str]:
    """Messages for the ``PYARRAYPOOL_*`` variables that could not be read."""
    return list(_env_problems.values())


def init_from_env() -> None:
    """The settings for creating the pool, from the defaults and the
    ``PYARRAYPOOL_*`` variables (a bad one keeps its default and is
    reported at first use). Never attaches."""
    env, problems = env_settings()
    _core._configure(
        int(env.get("max_bytes", default_max_bytes())),
        int(env.get("segment_bytes", DEFAULT_SEGMENT_BYTES)),
        float(env.get("transfer_timeout", DEFAULT_TRANSFER_TIMEOUT)),
        False,  # only the settings for creating the pool; never attaches
        float(env.get("decay", DEFAULT_DECAY)),
    )
    set_env_problems(problems)


def _leave_inherited_pool_if_settings_differ(max_bytes: int, segment_bytes: int,
                                             timeout: float, decay: float) -> None:
    # A tool started with subprocess by a program that uses the pool inherits
    # the program's pool name; asking for other settings, it wants a pool of
    # its own, not a PoolError (the rule: _lifecycle.py). Looked at as an
    # observer, so that this process does not join the pool it may leave.
    if not _lifecycle.may_take_own_pool():
        return
    running = _core._inspect(os.environ[_lifecycle.ENV_POOL], False)
    if running is None:
        return  # no pool yet: this process's settings will create it
    wanted = (max_bytes, segment_bytes, int(timeout * 1e9), int(decay * 1e9))
    have = (running["max_bytes"], running["segment_bytes"], running["transfer_timeout_ns"],
            round(running["decay"] * 1e9))
    if wanted != have:
        _lifecycle.take_own_pool(
            f"configure() asked for max_bytes={max_bytes}, segment_bytes={segment_bytes}, "
            f"transfer_timeout={timeout:g}, decay={decay:g}, and it runs with "
            f"max_bytes={have[0]}, segment_bytes={have[1]}, "
            f"transfer_timeout={running['transfer_timeout']:g}, decay={running['decay']:g}")


def configure(
    *,
    max_bytes: int | str | None = None,
    segment_bytes: int | str | None = None,
    transfer_timeout: float | None = None,
    decay: float | None = None,
) -> None:
    """Set the pool's settings; call it before the program first uses the pool.

    The pool is created with these settings by the first process of the
    program that uses it (allocates or loads a handle). Settings left out keep
    their current values. The same settings come from the environment
    variables ``PYARRAYPOOL_MAX_BYTES``, ``PYARRAYPOOL_SEGMENT_BYTES``,
    ``PYARRAYPOOL_TRANSFER_TIMEOUT`` and ``PYARRAYPOOL_DECAY``; ``configure``
    sets them as well, so
    processes started afterwards (which may be the first to use the pool)
    agree.

    Parameters
    ----------
    max_bytes : int or str, optional
        The most shared memory the pool may map (default: the size of
        /dev/shm). An int, or a string such as ``"512M"`` or ``"2G"``
        (binary units: K = 1024).
    segment_bytes : int or str, optional
        The size by which the pool grows (default 64 MiB). An array larger
        than this gets a segment of its own; when /dev/shm has no room for a
        whole segment, a smaller one is made.
    transfer_timeout : float, optional
        Seconds after which a pickle made with ``transfer_required=True`` that
        was never loaded stops keeping its block alive (default 300).
    decay : float, optional
        Seconds free pool memory stays reserved before it goes back to the
        system (default 2). Memory reused within that time costs nothing to
        reuse; memory given back costs reserving (zeroing) pages again.
        0 gives it back as soon as the pool's keeper (or ``collect()``,
        ``stats()``) next looks.

    A process started with ``subprocess`` (not a multiprocessing worker)
    that inherited the program's pool and has not used it yet gets a fresh
    pool of its own when these settings differ from that pool's, and logs
    one INFO line saying so (docs/lifetime.md).

    Raises
    ------
    PoolError
        The pool is already running with other settings (in a process that
        has used it, or that must share it: a multiprocessing worker).
    ValueError
        A size or timeout that is not positive, or a size string that cannot
        be read; or a ``PYARRAYPOOL_*`` variable that cannot be read, unless
        this call gives that setting (which then replaces it).
    TypeError
        A size that is neither an int nor a string.
    """
    given = {"max_bytes": max_bytes, "segment_bytes": segment_bytes,
             "transfer_timeout": transfer_timeout, "decay": decay}
    left_bad = [msg for key, msg in _env_problems.items() if given[key] is None]
    if left_bad:
        raise ValueError("; ".join(left_bad))
    current = _core._config()
    new_max = parse_size(max_bytes) if max_bytes is not None else current["max_bytes"]
    new_seg = parse_size(segment_bytes) if segment_bytes is not None else current["segment_bytes"]
    if transfer_timeout is None:
        new_timeout = current["transfer_timeout"]
    else:
        new_timeout = parse_timeout(transfer_timeout)
    new_decay = current["decay"] if decay is None else parse_decay(decay)
    _leave_inherited_pool_if_settings_differ(new_max, new_seg, new_timeout, new_decay)
    _core._configure(new_max, new_seg, new_timeout, True, new_decay)
    set_env_problems({})  # every bad variable's setting was given here
    # Processes started from now on (spawn workers may be the first to use
    # the pool and so create it) take the same settings.
    os.environ["PYARRAYPOOL_MAX_BYTES"] = str(new_max)
    os.environ["PYARRAYPOOL_SEGMENT_BYTES"] = str(new_seg)
    os.environ["PYARRAYPOOL_TRANSFER_TIMEOUT"] = repr(new_timeout)
    os.environ["PYARRAYPOOL_DECAY"] = repr(new_decay)


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool, as returned by :func:`stats`."""

    pool: str  #: the pool's token (32 hex digits; its name in /dev/shm)
    used_bytes: int  #: bytes in live blocks, their 64-byte headers included
    capacity_bytes: int  #: bytes of shared memory in the pool's data segments
    free_bytes: int  #: ``capacity_bytes - used_bytes``
    largest_free_block: int  #: bytes of the largest free block (headers included)
    live_blocks: int  #: blocks in use
    pending_transfers: int  #: pickles made with ``transfer_required`` and not loaded yet
    pending_blocks: int  #: blocks that have at least one such pickle
    processes: int  #: live processes attached to the pool
    pids: tuple[int, ...]  #: their process ids
    segments: int  #: data segments created so far (including ones given back)
    max_bytes: int  #: the most shared memory the pool may map (a setting)
    segment_bytes: int  #: the size by which the pool grows (a setting)
    transfer_timeout: float  #: seconds an unloaded pickle keeps its block (a setting)
    #: bytes of /dev/shm the pool's files hold now (pages reserved; control segment included)
    reserved_bytes: int = 0
    #: bytes given back to the system since the pool was made (idle pages, removed segments)
    returned_bytes: int = 0
    decay: float = 2.0  #: seconds free memory stays reserved before it goes back (a setting)
    # Only with stats(detail=True), which walks every block; empty otherwise.
    # `python -m pyarraypool stats --json` prints the same fields.
    size_classes: tuple[dict[str, int], ...] = ()  #: used/free blocks and bytes per size class
    holdings: tuple[dict[str, Any], ...] = ()  #: pid, blocks and bytes held, per process
    pending: tuple[dict[str, Any], ...] = ()  #: per block with pickles pending: size, age, pid
    pending_bytes: int = 0  #: bytes of the blocks in ``pending``
    oldest_pending_age: float = 0.0  #: seconds since the oldest pending pickle was made


def stats_from_dict(d: dict[str, Any]) -> PoolStats:
    fields = {f.name for f in dataclasses.fields(PoolStats)}
    values = {k: v for k, v in d.items() if k in fields}
    values["pids"] = tuple(values["pids"])
    for key in ("size_classes", "holdings", "pending"):
        if key in values:
            values[key] = tuple(values[key])
    return PoolStats(**values)


def stats(detail: bool = False) -> PoolStats:
    """A snapshot of the program's pool.

    First empties this process's cache of freed blocks and reclaims what dead
    processes held and pickles whose ``transfer_timeout`` has passed, so the
    figures are exact for this process. Attaches the process to the pool if
    it has not used it yet.

    Parameters
    ----------
    detail : bool, optional
        Also fill ``size_classes``, ``holdings`` (what each process holds) and
        ``pending`` (pickles not loaded yet, with their age and sender). This
        walks every block of the pool under its lock.

    Returns
    -------
    PoolStats
        Usage, counts, attached processes and settings.

    Raises
    ------
    PoolError
        The pool cannot be attached (for example, 4096 processes already are).
    """
    return stats_from_dict(_core._stats(detail))
