"""A producer/consumer pipeline over multiprocessing Queues.

Producer processes make arrays directly in the pool (`pyarraypool.empty`,
filled in place) and put them on a work queue: only a handle goes through the
queue's pipe. Consumer processes clip each array in place and compute its
histogram into a new pool array, which goes back on a result queue. Once the
producers have finished, the parent puts one sentinel (None) per consumer on
the work queue; each consumer answers with a sentinel of its own and exits.
The parent checks every array and every histogram against the same
computation done on its own.

    python examples/queue_pipeline.py [fork|spawn|forkserver]
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.queues import Queue

import numpy as np
import numpy.typing as npt

import pyarraypool

PRODUCERS = 2
CONSUMERS = 2
ITEMS = 12  # per producer
SHAPE = (256, 256)
CLIP = 200

# (producer, sequence number, data) on the work queue;
# (producer, sequence number, data, histogram) on the result queue.
Work = tuple[int, int, npt.NDArray[np.uint8]]
Result = tuple[int, int, npt.NDArray[np.uint8], npt.NDArray[np.int64]]


def source_data(producer: int, seq: int) -> npt.NDArray[np.uint8]:
    """What producer `producer` makes as item `seq` (the parent makes it again to check)."""
    rng = np.random.default_rng([producer, seq])
    return rng.integers(0, 256, size=SHAPE, dtype=np.uint8)


def produce(producer: int, work: Queue[Work | None]) -> None:
    for seq in range(ITEMS):
        data = pyarraypool.empty(SHAPE, dtype=np.uint8)
        data[...] = source_data(producer, seq)
        work.put((producer, seq, data))
    # The producer may exit before anyone loads what it put: each array stays
    # alive until its pickle is loaded.


def consume(work: Queue[Work | None], results: Queue[Result | None]) -> None:
    while (item := work.get()) is not None:
        producer, seq, data = item
        if not isinstance(data, pyarraypool.TransferableArray):
            raise TypeError(f"the consumer received a {type(data).__name__}, by value")
        np.minimum(data, CLIP, out=data)  # in place: the parent sees it
        histogram = pyarraypool.zeros(256, dtype=np.int64)
        histogram[...] = np.bincount(data.ravel(), minlength=256)
        results.put((producer, seq, data, histogram))
    results.put(None)


def main() -> None:
    used_before = pyarraypool.stats().used_bytes
    work: Queue[Work | None] = multiprocessing.Queue()
    results: Queue[Result | None] = multiprocessing.Queue()
    consumers = [multiprocessing.Process(target=consume, args=(work, results))
                 for _ in range(CONSUMERS)]
    producers = [multiprocessing.Process(target=produce, args=(p, work))
                 for p in range(PRODUCERS)]
    processes = consumers + producers
    for proc in processes:
        proc.start()

    for proc in producers:
        proc.join()
    for _ in range(CONSUMERS):
        work.put(None)

    received: dict[tuple[int, int], tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]] = {}
    finished = 0
    while finished < CONSUMERS:
        result = results.get(timeout=120)
        if result is None:
            finished += 1
            continue
        producer, seq, data, histogram = result
        received[producer, seq] = (data, histogram)
    for proc in processes:
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"FAILED: {proc.name} exited with {proc.exitcode}")

    expected_keys = {(p, s) for p in range(PRODUCERS) for s in range(ITEMS)}
    if set(received) != expected_keys:
        sys.exit(f"FAILED: missing results {sorted(expected_keys - set(received))}")
    for (producer, seq), (data, histogram) in received.items():
        want = np.minimum(source_data(producer, seq), CLIP)
        if not isinstance(data, pyarraypool.TransferableArray) or not np.array_equal(data, want):
            sys.exit(f"FAILED: item {producer}/{seq} was not clipped in place")
        if not np.array_equal(histogram, np.bincount(want.ravel(), minlength=256)):
            sys.exit(f"FAILED: wrong histogram for item {producer}/{seq}")

    del received, data, histogram, result
    work.close()
    results.close()
    used = pyarraypool.stats().used_bytes
    if used != used_before:
        sys.exit(f"FAILED: {used - used_before} bytes still used in the pool after the run")
    print(
        f"queue_pipeline ({multiprocessing.get_start_method()}): {len(expected_keys)} arrays from "
        f"{PRODUCERS} producers through {CONSUMERS} consumers; every result checked"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        multiprocessing.set_start_method(sys.argv[1])
    main()
