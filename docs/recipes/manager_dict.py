"""A multiprocessing.Manager dict holds handles, not the arrays' bytes."""

import multiprocessing

import pyarraypool


def worker(shared, key):
    x = pyarraypool.empty(100_000)
    x[:] = key
    shared[key] = x  # pickled into the manager process: a handle travels


if __name__ == "__main__":
    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        procs = [multiprocessing.Process(target=worker, args=(shared, k)) for k in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        # Each lookup loads a handle: a TransferableArray on the worker's block.
        results = {k: shared[k] for k in range(4)}
        assert all((results[k] == k).all() for k in range(4))
        # The manager process itself has loaded every handle stored in the dict
        # and holds those blocks until the entries are deleted or it exits.
        shared.clear()
    print("Manager dict: ok")
