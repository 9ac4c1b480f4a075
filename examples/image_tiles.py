"""Image tiles processed in place by a multiprocessing Pool.

The image, 2048x2048 RGB uint8 (12 MiB), is one pool array made by
`pyarraypool.zeros`. Every task receives the whole image (pickled as a
handle of under 200 bytes, not 12 MiB) and the corner of one 256x256 tile,
and inverts that tile in place; nothing is sent back. The parent then checks
every tile, and that the image's bytes go back to the pool once it is dropped.

    python examples/image_tiles.py [fork|spawn|forkserver]
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np
import numpy.typing as npt

import pyarraypool

SIZE = 2048
TILE = 256
WORKERS = 4


def gradient(size: int) -> npt.NDArray[np.uint8]:
    """The picture the parent starts from: a different value in each channel."""
    y = np.arange(size)[:, None, None]
    x = np.arange(size)[None, :, None]
    c = np.arange(3)[None, None, :]
    # Annotated: NumPy 2.2's stubs (the last NumPy for Python 3.10) type this as Any.
    picture: npt.NDArray[np.uint8] = ((x + 2 * y + 85 * c) % 256).astype(np.uint8)
    return picture


def invert_tile(image: npt.NDArray[np.uint8], y0: int, x0: int) -> int:
    """Runs in a worker: writes one tile of the parent's image, in place."""
    if not isinstance(image, pyarraypool.TransferableArray):
        raise TypeError(f"the image arrived as a {type(image).__name__}, by value")
    tile = image[y0 : y0 + TILE, x0 : x0 + TILE]
    np.subtract(255, tile, out=tile)
    return os.getpid()


def main() -> None:
    used_before = pyarraypool.stats().used_bytes
    image = pyarraypool.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[...] = gradient(SIZE)
    corners = [(y, x) for y in range(0, SIZE, TILE) for x in range(0, SIZE, TILE)]
    with multiprocessing.Pool(processes=WORKERS) as pool:
        pids = pool.starmap(invert_tile, [(image, y, x) for y, x in corners])
        pool.close()
        pool.join()

    expected = 255 - gradient(SIZE)
    wrong = [
        (y, x)
        for y, x in corners
        if not np.array_equal(image[y : y + TILE, x : x + TILE],
                              expected[y : y + TILE, x : x + TILE])
    ]
    if wrong:
        sys.exit(f"FAILED: {len(wrong)} tiles are not what their worker wrote, first {wrong[0]}")
    if os.getpid() in pids:
        sys.exit("FAILED: a tile was processed in the parent")

    del image
    used = pyarraypool.stats().used_bytes
    if used != used_before:
        sys.exit(f"FAILED: {used - used_before} bytes still in use after the image was dropped")
    print(
        f"image_tiles ({multiprocessing.get_start_method()}): {len(corners)} tiles of "
        f"{TILE}x{TILE} inverted in place by a Pool of {WORKERS}; every tile checked"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        multiprocessing.set_start_method(sys.argv[1])
    main()
