"""multiprocessing.Queue and Pipe carry pool arrays as handles."""

import multiprocessing

import numpy as np

import pyarraypool


def producer(queue, n):
    for i in range(n):
        frame = pyarraypool.empty((480, 640), dtype=np.uint8)
        frame[:] = i
        queue.put(frame)  # pickled in the queue's feeder thread: a ~100-byte handle
        del frame  # safe: the pending pickle keeps the block until the consumer loads it
    queue.put(None)


def echo(conn):
    x = conn.recv()  # the same memory as the sender's array
    x += 1
    conn.send(x)  # and back again, still by handle
    conn.close()


if __name__ == "__main__":
    queue = multiprocessing.Queue(maxsize=4)
    p = multiprocessing.Process(target=producer, args=(queue, 10))
    p.start()
    total = 0
    while (frame := queue.get()) is not None:
        total += int(frame[0, 0])
    p.join()
    assert total == sum(range(10))

    parent_end, child_end = multiprocessing.Pipe()
    c = multiprocessing.Process(target=echo, args=(child_end,))
    c.start()
    x = pyarraypool.zeros(1000)
    parent_end.send(x)
    y = parent_end.recv()
    c.join()
    assert (x == 1).all() and (y == 1).all()  # one block, seen by both processes
    print("Queue and Pipe: ok")
