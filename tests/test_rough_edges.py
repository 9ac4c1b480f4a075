"""Rough edges a new user hit when trying the library from outside (issue 11).

Each test below failed before its fix; the behaviour it asserts is documented
in the README, docs/faq.md or docs/cli.md.
"""

from __future__ import annotations

from test_config import needs_private_shm, run_with_shm

# --- PoolFullError when /dev/shm, not max_bytes, is what is short ------------------


@needs_private_shm
def test_pool_full_in_a_64_mib_dev_shm_names_dev_shm_and_shm_size():
    """Docker's default /dev/shm is 64 MiB, and max_bytes defaults to its
    size: a request larger than /dev/shm, and one that no longer fits once
    the pool has filled /dev/shm, cannot be helped by raising max_bytes. The
    message says so: it names /dev/shm (its size and free space) and how to
    make it larger, not max_bytes."""
    proc = run_with_shm("64M", """
    msgs = []
    try:
        pyarraypool.empty(100 << 20, dtype=np.uint8)        # larger than /dev/shm
    except pyarraypool.PoolFullError as e:
        msgs.append(str(e))
    arrs = []
    try:
        for _ in range(20):                                   # fills /dev/shm
            arrs.append(pyarraypool.empty(8 << 20, dtype=np.uint8))
    except pyarraypool.PoolFullError as e:
        msgs.append(str(e))
    assert len(msgs) == 2, msgs
    for m in msgs:
        print(m)
        print("----")
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for msg in proc.stdout.split("----")[:2]:
        assert "/dev/shm" in msg and "64.0 MiB" in msg and "free" in msg, msg
        assert "--shm-size" in msg and "remount,size=" in msg, msg
        assert "Raise max_bytes" not in msg and "configure(max_bytes" not in msg, msg


@needs_private_shm
def test_pool_full_under_max_bytes_still_advises_max_bytes():
    """When /dev/shm has room and max_bytes is the limit, raising max_bytes is
    the advice, and Docker's --shm-size is not."""
    proc = run_with_shm("64M", """
    pyarraypool.configure(max_bytes="16M")
    try:
        pyarraypool.empty(32 << 20, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        print(e)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = proc.stdout
    assert "max_bytes=16777216" in msg and "configure(max_bytes=" in msg, msg
    assert "--shm-size" not in msg, msg
