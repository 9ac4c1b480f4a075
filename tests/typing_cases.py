"""How shapes and dtypes flow through pyarraypool's types.

tests/test_typing.py runs `mypy --strict` on this file (each `assert_type` must
hold for the type checker) and also calls `check_cases()` (each value must be
what its static type says). Not collected by pytest on its own.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, get_args, get_origin

if sys.version_info >= (3, 11):
    from typing import assert_type
elif TYPE_CHECKING:  # Python 3.10: mypy knows it from typing_extensions
    from typing_extensions import assert_type
else:  # ... and at run time it is the identity, as typing's is

    def assert_type(value: Any, typ: Any, /) -> Any:
        return value

import numpy as np

import pyarraypool
from pyarraypool import TransferableArray

Float32 = np.dtype[np.float32]
Float64 = np.dtype[np.float64]
AnyShape = tuple[Any, ...]


def make_transferable_cases() -> None:
    x = pyarraypool.make_transferable(np.zeros(3, np.float32))
    assert_type(x, TransferableArray[tuple[int], Float32])
    assert x.shape == (3,) and x.dtype == np.float32

    m = pyarraypool.make_transferable(np.ones((2, 4)), transfer_required=False)
    assert_type(m, TransferableArray[tuple[int, int], Float64])
    assert m.shape == (2, 4) and m.dtype == np.float64

    # An array already in the pool comes back as it is, with its type.
    assert_type(pyarraypool.make_transferable(x), TransferableArray[tuple[int], Float32])
    assert pyarraypool.make_transferable(x) is x

    s = pyarraypool.make_transferable(np.int16(7))
    assert_type(s, TransferableArray[tuple[()], np.dtype[np.int16]])
    assert s.shape == () and s.dtype == np.int16

    lst = pyarraypool.make_transferable([1.0, 2.0])
    assert_type(lst, TransferableArray[AnyShape, np.dtype[Any]])
    assert lst.shape == (2,)


def allocation_cases() -> None:
    e = pyarraypool.empty(5)
    assert_type(e, TransferableArray[tuple[int], Float64])
    assert e.shape == (5,) and e.dtype == np.float64

    z = pyarraypool.zeros((2, 3), dtype=np.float64)
    assert_type(z, TransferableArray[tuple[int, int], Float64])
    assert z.shape == (2, 3) and z.dtype == np.float64 and not z.any()

    i8 = pyarraypool.zeros((2, 3, 4), np.dtype(np.int8), "F")
    assert_type(i8, TransferableArray[tuple[int, int, int], np.dtype[np.int8]])
    assert i8.dtype == np.int8 and i8.flags.f_contiguous

    u16 = pyarraypool.empty([2, 3], np.uint16, transfer_required=False)
    assert_type(u16, TransferableArray[AnyShape, np.dtype[np.uint16]])
    assert u16.shape == (2, 3) and u16.dtype == np.uint16

    by_name = pyarraypool.empty(4, "f4")
    assert_type(by_name, TransferableArray[tuple[int], np.dtype[Any]])
    assert by_name.dtype == np.float32

    proto = pyarraypool.zeros((2, 2), np.complex64)
    like = pyarraypool.empty_like(proto)
    assert_type(like, TransferableArray[tuple[int, int], np.dtype[np.complex64]])
    assert like.shape == (2, 2) and like.dtype == np.complex64

    recast = pyarraypool.zeros_like(proto, dtype=np.int64)
    assert_type(recast, TransferableArray[AnyShape, np.dtype[np.int64]])
    assert recast.dtype == np.int64 and not recast.any()

    from_list = pyarraypool.zeros_like([[1, 2, 3]])
    assert_type(from_list, TransferableArray[AnyShape, np.dtype[Any]])
    assert from_list.shape == (1, 3)


def subclass_cases() -> None:
    x = pyarraypool.zeros((4, 4), np.float32)
    # A TransferableArray is an ndarray of the same shape and dtype...
    plain: np.ndarray[tuple[int, int], Float32] = x
    # ...and numpy's own typing applies to it: arithmetic gives a plain array.
    doubled = plain * 2
    assert_type(doubled, np.ndarray[tuple[int, int], Float32])
    assert type(doubled) is np.ndarray
    # The bare name means any shape and any dtype, as np.ndarray does.
    bare: TransferableArray = x
    assert_type(bare, TransferableArray[AnyShape, np.dtype[Any]])
    # The class subscripts at run time as ndarray does.
    alias = TransferableArray[Any, np.dtype[np.float64]]
    assert get_origin(alias) is TransferableArray
    assert get_args(alias) == (Any, np.dtype[np.float64])


def check_cases() -> None:
    make_transferable_cases()
    allocation_cases()
    subclass_cases()
