"""The Python face of the pool: allocation helpers, settings and statistics."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol, SupportsIndex, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _core
from ._core import TransferableArray
from ._settings import parse_size

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
    """Like :func:`numpy.empty`, allocated in the pool (no copy, contents undefined)."""
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
    """Like :func:`numpy.zeros`, allocated in the pool."""
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
    """Like :func:`numpy.empty_like`, allocated in the pool.

    The result is always a TransferableArray (``subok`` is accepted for
    compatibility). ``order='K'`` keeps Fortran order for Fortran-contiguous
    prototypes and uses C order otherwise.
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
    """Like :func:`numpy.zeros_like`, allocated in the pool."""
    shp, dt, cf = _like_args(prototype, dtype, order, shape)
    return _core._empty(shp, dt, cf, transfer_required, True)


def configure(
    *,
    max_bytes: int | str | None = None,
    segment_bytes: int | str | None = None,
    transfer_timeout: float | None = None,
) -> None:
    """Set the pool's settings; call it before the program first uses the pool.

    ``max_bytes``: the most shared memory the pool may take (default: the size
    of /dev/shm). ``segment_bytes``: the size by which it grows (default 64 MiB;
    a larger array gets a segment of its own). ``transfer_timeout``: seconds
    after which a pickle that was never loaded stops keeping its block alive
    (default 300). Sizes accept ints or strings such as ``"512M"``, ``"2G"``.
    The same settings come from ``PYARRAYPOOL_MAX_BYTES``,
    ``PYARRAYPOOL_SEGMENT_BYTES`` and ``PYARRAYPOOL_TRANSFER_TIMEOUT``.

    Raises :class:`PoolError` if the pool is already running with other settings.
    """
    current = _core._config()
    new_max = parse_size(max_bytes) if max_bytes is not None else current["max_bytes"]
    new_seg = parse_size(segment_bytes) if segment_bytes is not None else current["segment_bytes"]
    if transfer_timeout is None:
        new_timeout = current["transfer_timeout"]
    else:
        new_timeout = float(transfer_timeout)
        if not new_timeout > 0:
            raise ValueError("transfer_timeout must be a positive number of seconds")
    _core._configure(new_max, new_seg, new_timeout, True)
    # Processes started from now on (spawn workers may be the first to use
    # the pool and so create it) take the same settings.
    os.environ["PYARRAYPOOL_MAX_BYTES"] = str(new_max)
    os.environ["PYARRAYPOOL_SEGMENT_BYTES"] = str(new_seg)
    os.environ["PYARRAYPOOL_TRANSFER_TIMEOUT"] = repr(new_timeout)


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool, as returned by :func:`stats`."""

    pool: str
    used_bytes: int  #: bytes in live blocks, headers included
    capacity_bytes: int  #: bytes of shared memory the pool has mapped
    free_bytes: int
    largest_free_block: int
    live_blocks: int
    pending_transfers: int  #: pickles made but not loaded yet
    pending_blocks: int
    processes: int  #: live processes attached to the pool
    pids: tuple[int, ...]
    segments: int
    max_bytes: int
    segment_bytes: int
    transfer_timeout: float
    # Only with stats(detail=True), which walks every block; empty otherwise.
    # See `python -m pyarraypool stats` and docs/design.md for the fields.
    size_classes: tuple[dict[str, int], ...] = ()  #: used/free blocks and bytes per size class
    holdings: tuple[dict[str, Any], ...] = ()  #: pid, blocks and bytes held, per process
    pending: tuple[dict[str, Any], ...] = ()  #: per block with pickles pending: size, age, pid
    pending_bytes: int = 0
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
    """Statistics of the program's pool. Reclaims what dead processes held first.

    With ``detail=True`` it also fills ``size_classes``, ``holdings`` and
    ``pending``; that walks every block of the pool under its lock.
    """
    return stats_from_dict(_core._stats(detail))
