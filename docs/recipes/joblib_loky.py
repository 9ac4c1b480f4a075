"""joblib.Parallel with the loky backend (joblib's default)."""

import numpy as np
from joblib import Parallel, delayed

import pyarraypool


def blur_rows(image, start, stop):
    out = pyarraypool.empty((stop - start, image.shape[1]))  # the result, made in the pool
    out[:] = (image[start:stop] + np.roll(image[start:stop], 1, axis=1)) / 2
    return out  # returned by handle, not by value


if __name__ == "__main__":
    image = pyarraypool.make_transferable(np.random.default_rng(1).random((2048, 2048)))
    chunks = [(i, i + 256) for i in range(0, 2048, 256)]
    parts = Parallel(n_jobs=2, backend="loky")(delayed(blur_rows)(image, a, b) for a, b in chunks)
    result = np.concatenate(parts)  # a plain numpy.ndarray (a new array, not in the pool)
    expected = (image + np.roll(image, 1, axis=1)) / 2
    assert np.allclose(result, expected)
    print("joblib loky: ok")
