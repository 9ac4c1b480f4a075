"""Dask distributed: pool arrays go by handle within a pool, by value elsewhere.

Turn it on with one line in the client program::

    pyarraypool.dask.install(client)

or, for workers started with the ``dask worker`` command line,
``--preload pyarraypool.dask``. See docs/dask.md.

How it decides. Every process that installed this module adds the identity of
its pool (token, instance, boot id) to the handshake Dask's comms exchange
when they connect. When Dask serializes a :class:`~pyarraypool.TransferableArray`
for a message, the serializer's ``context`` names the recipient's handshake:
if it carries the sender's own pool identity, the array goes as its handle
(the pickle of the array, a few hundred bytes whatever its size); otherwise
(another host, a peer without pyarraypool, or no context at all: spilling to
disk, ``serialize`` called by hand) it goes exactly as Dask sends a numpy
array, and the recipient gets a plain ndarray, or a pool array when it asked
for that (``remote_as_pool``).

Auto mode (``install(client, min_bytes=N)``): a plain ndarray (exact type
``np.ndarray``) of at least N bytes bound for a process of the sender's pool
is copied into a fresh pool block and sent as a private handle
(``_core._auto_reduce``); the recipient gets a plain ndarray on that block,
its own. Towards anyone else it goes by value, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import copyreg
import functools
import hashlib
import logging
import os
import pickle
import secrets
import stat
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from distributed.comm.addressing import get_address_host_port
from distributed.comm.core import Comm
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol import numpy as _dask_numpy  # noqa: F401  (registers ndarray)
from distributed.protocol import pickle as _dask_pickle
from distributed.protocol.serialize import (
    dask_deserialize,
    families,
    register_serialization_family,
)

from . import _core, _lifecycle
from ._core import StaleHandleError, TransferableArray, make_transferable

__all__ = ["install", "PyArrayPoolPlugin", "dask_setup", "counters", "cluster_pool_name"]

logger = logging.getLogger("pyarraypool.dask")

#: Key of the pool identity in a comm's handshake and in a handle's header.
HANDSHAKE_KEY = "pyarraypool"
#: "1" makes this process turn pool arrays that arrive by value into pool arrays.
ENV_REMOTE_AS_POOL = "PYARRAYPOOL_DASK_REMOTE_AS_POOL"
#: Set to the pool name when `import pyarraypool` drew it at random (not given).
ENV_RANDOM_POOL = "PYARRAYPOOL_DASK_RANDOM_POOL"
_IDENTITY_FIELDS = ("token", "instance", "boot_id")
#: What a serialization family's dumps returns: a header and frames.
Serialized = tuple[dict[str, Any], list[Any]]

_lock = threading.Lock()
_installed = False
_remote_as_pool = False
# Auto mode: plain ndarrays of at least this many bytes go by private handle
# to processes of this pool; None: off.
_auto_min_bytes: int | None = None
_original_dask_dumps: Any = None
_original_ndarray_loads: Any = None
_original_handshake_info: Any = None
_original_dask_pickle_dumps: Any = None
# Set (to the pickle protocol) while Dask's own pickler runs in this thread.
_dask_pickling = threading.local()
_counters = {
    "sent_by_handle": 0,
    "sent_by_value": 0,
    "received_by_handle": 0,
    "received_as_pool": 0,
    "auto_sent_by_handle": 0,
    "auto_received_by_handle": 0,
}


def counters() -> dict[str, int]:
    """How many pool arrays this process sent and received, by which path.

    ``sent_by_handle`` / ``sent_by_value``: pool arrays serialized for a
    message; ``received_by_handle``: handles loaded; ``received_as_pool``:
    arrays that arrived by value and were copied into this process's pool
    (``remote_as_pool``); ``auto_sent_by_handle`` / ``auto_received_by_handle``:
    plain ndarrays sent and loaded as private handles (auto mode, ``min_bytes``).
    Use ``client.run(pyarraypool.dask.counters)`` to see every worker's.
    """
    with _lock:
        return dict(_counters)


def _count(name: str) -> None:
    with _lock:
        _counters[name] += 1


# -- identities ---------------------------------------------------------------


def _own_identity() -> dict[str, str] | None:
    """This process's pool identity (attaching to the pool), or None if it cannot."""
    try:
        ident = _core._pool_identity()
    except _core.PoolError:  # shut down (exiting), or the pool cannot be attached
        return None
    return {k: str(ident[k]) for k in _IDENTITY_FIELDS}


def _same_pool(peer: object, own: dict[str, str] | None) -> bool:
    if own is None or not isinstance(peer, dict):
        return False
    return all(peer.get(k) == own[k] for k in _IDENTITY_FIELDS)


def _recipient_shares_pool(context: dict[str, Any] | None) -> bool:
    # No context (spilling, a serialize() call by hand) means no recipient we
    # know of: the bytes may be read anywhere, later, so they must be data.
    if not context:
        return False
    recipient = context.get("recipient")
    if not isinstance(recipient, dict):
        return False
    peer = recipient.get(HANDSHAKE_KEY)
    return peer is not None and _same_pool(peer, _own_identity())


def _port(address_of: Any) -> int | None:
    try:
        return get_address_host_port(address_of())[1]
    except (ValueError, TypeError):
        return None  # inproc:// and other addresses without a port; a closed listener


def _is_scheduler_comm(comm: Comm) -> bool:
    """Whether `comm` belongs to a scheduler running in this process.

    A scheduler relays data it does not open (gather, scatter, run results
    pass through it as serialized frames), so it must never claim a pool: a
    worker would send it a handle that it then forwards to a process on
    another host. Its accepted comms are found by their local port; its
    outgoing comms get the identity erased through the scheduler's own
    handshake overrides, applied after this method returns.
    """
    scheduler_module = sys.modules.get("distributed.scheduler")
    if scheduler_module is None:
        return False
    port = None
    for scheduler in list(scheduler_module.Scheduler._instances):
        args = scheduler.rpc.connection_args
        overrides = args.get("handshake_overrides")
        if overrides is None:
            overrides = args["handshake_overrides"] = {}
        overrides[HANDSHAKE_KEY] = None
        if port is None:
            port = _port(lambda: comm.local_address)
        listening = {_port(lambda ln=ln: ln.listen_address) for ln in scheduler.listeners}
        if port is not None and port in listening:
            return True
    return False


def _handshake_info(self: Comm) -> dict[str, Any]:
    info: dict[str, Any] = _original_handshake_info(self)
    if _is_scheduler_comm(self):
        return info
    ident = _own_identity()
    if ident is not None:
        info[HANDSHAKE_KEY] = ident
    return info


# -- serialization ------------------------------------------------------------


def _dumps(x: object, context: dict[str, Any] | None = None) -> Serialized:
    """Dask's "dask" family, with pool arrays sent by handle when the recipient shares the pool."""
    if type(x) is np.ndarray:
        auto = _auto_dumps(x, context)
        if auto is not None:
            return auto
    if not isinstance(x, TransferableArray):
        return cast(Serialized, _original_dask_dumps(x, context=context))
    if _recipient_shares_pool(context):
        # Pickling counts a pending transfer that keeps the block alive until
        # the recipient loads it (or the pool's transfer timeout passes).
        outer = getattr(_dask_pickling, "protocol", None)
        _dask_pickling.protocol = None  # a handle, even inside one of Dask's pickles
        try:
            frame = pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            _dask_pickling.protocol = outer
        _count("sent_by_handle")
        header = {
            "sub-header": {HANDSHAKE_KEY: "handle", "pool": _own_identity()},
            "type": "pyarraypool.TransferableArray",
            "type-serialized": pickle.dumps(TransferableArray),
        }
        return header, [frame]
    # By value, byte for byte as Dask sends an ndarray (np.asarray is a view:
    # no copy), so a recipient without pyarraypool reads it too. The mark
    # lets a recipient that asked for it put the array back into a pool.
    header, frames = _original_dask_dumps(np.asarray(x), context=context)
    header["sub-header"][HANDSHAKE_KEY] = "value"
    _count("sent_by_value")
    return header, frames


class _PrivateCopy:
    """Names auto mode's messages in Dask's headers (``type-serialized``):
    a plain ndarray's private copy in the pool, sent as its handle."""


#: Set, while a message is being sent, to the private copies made for it,
#: as (handle frame, reduce arguments): if the send fails, or a copy is not
#: in the frames that go out, the sender takes it back.
_in_flight: contextvars.ContextVar[list[tuple[bytes, Any]] | None] = contextvars.ContextVar(
    "pyarraypool_dask_in_flight", default=None)


def _auto_dumps(x: np.ndarray, context: dict[str, Any] | None) -> Serialized | None:
    """A plain ndarray as a private handle, or None to send it as before."""
    min_bytes = _auto_min_bytes
    if min_bytes is None or x.nbytes < min_bytes or not _recipient_shares_pool(context):
        return None
    try:
        reduced = _core._auto_reduce(x)
    except _core.PoolFullError as e:
        # The pool is full: the bytes still fit on the wire.
        logger.debug("pyarraypool.dask: sending an array by value: %s", e)
        return None
    if reduced is NotImplemented:  # a dtype the pool cannot hold (objects, ...)
        return None
    _rebuild, args = reduced
    frame = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
    made = _in_flight.get()
    if made is not None:
        made.append((frame, args))
    _count("auto_sent_by_handle")
    header = {
        "sub-header": {HANDSHAKE_KEY: "auto", "pool": _own_identity()},
        "type": "pyarraypool.auto",
        "type-serialized": _PRIVATE_COPY_TYPE,
    }
    return header, [frame]


_PRIVATE_COPY_TYPE = pickle.dumps(_PrivateCopy)


def _take_back(made: list[tuple[bytes, Any]]) -> None:
    """Frees the private copies of a message that may not have arrived.

    A private handle loads once: loading it here consumes the pending
    transfer that would otherwise keep the block until the transfer timeout
    (and then warn). If the recipient loaded it first, this load is refused
    and the copy is the recipient's.
    """
    for _frame, args in made:
        try:
            _core._rebuild(*args)
        except StaleHandleError:
            pass


@contextlib.contextmanager
def _sending() -> Iterator[None]:
    """Around a send: private copies made for it are taken back if it fails."""
    if _in_flight.get() is not None:
        yield  # an enclosing send (get_data around its write) takes them back
        return
    made: list[tuple[bytes, Any]] = []
    token = _in_flight.set(made)
    try:
        yield
    except BaseException:
        _take_back(made)
        raise
    finally:
        _in_flight.reset(token)


def _check_sender_pool(header: dict[str, Any]) -> None:
    own = _own_identity()
    if not _same_pool(header.get("pool"), own):
        # Reachable only if something relays a message it did not open to a
        # process outside the sender's pool (schedulers never claim a pool
        # for this reason: see _is_scheduler_comm).
        raise StaleHandleError(
            f"a pool array arrived by handle from pool {header.get('pool')!r}, but this "
            f"process uses pool {own!r}: handles work only within one pool on one host "
            "(see docs/dask.md, 'Limits')"
        )


def _loads_handle(header: dict[str, Any], frames: list[Any]) -> TransferableArray:
    if header.get(HANDSHAKE_KEY) != "handle" or len(frames) != 1:
        raise _core.InvalidHandleError("a pyarraypool Dask message without a handle")
    _check_sender_pool(header)
    arr: TransferableArray = pickle.loads(frames[0])
    _count("received_by_handle")
    return arr


def _loads_private_copy(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
    if header.get(HANDSHAKE_KEY) != "auto" or len(frames) != 1:
        raise _core.InvalidHandleError("a pyarraypool Dask message without a handle")
    _check_sender_pool(header)
    arr: np.ndarray = _core._rebuild(*pickle.loads(frames[0]))
    _count("auto_received_by_handle")
    return arr


def _loads_ndarray(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
    arr: np.ndarray = _original_ndarray_loads(header, frames)
    if _remote_as_pool and header.get(HANDSHAKE_KEY) == "value":
        arr = make_transferable(arr)
        _count("received_as_pool")
    return arr


def _reduce_transferable(x: TransferableArray) -> Any:
    """How pickle reduces a pool array in a process that installed this module.

    Everywhere but inside Dask's own pickler this is the array's handle,
    exactly as without this module. Dask pickles task graphs, task arguments
    and wrapped objects (``client.submit(f, x)``) with no idea of where the
    bytes will be loaded: the scheduler unpickles them and a worker on any
    host may run the task, and Dask may pickle an object once more than it
    loads it (it retries with cloudpickle). There a handle is not data, so
    the array goes by value, as Dask pickles an ndarray.
    """
    protocol = getattr(_dask_pickling, "protocol", None)
    if protocol is None:
        return x.__reduce__()
    _count("sent_by_value")
    return np.asarray(x).__reduce_ex__(protocol)


def _dask_pickle_dumps(x: object, *, buffer_callback: Any = None, protocol: Any = None) -> bytes:
    previous = getattr(_dask_pickling, "protocol", None)
    _dask_pickling.protocol = protocol or pickle.HIGHEST_PROTOCOL
    try:
        result: bytes = _original_dask_pickle_dumps(
            x, buffer_callback=buffer_callback, protocol=protocol or pickle.HIGHEST_PROTOCOL
        )
        return result
    finally:
        _dask_pickling.protocol = previous


def _env_remote_as_pool() -> bool:
    return os.environ.get(ENV_REMOTE_AS_POOL, "").strip().lower() in ("1", "true", "yes", "on")


def _check_min_bytes(min_bytes: int | None) -> int | None:
    if min_bytes is None:
        return None
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int):
        raise TypeError(f"min_bytes must be an int (bytes) or None, not {min_bytes!r}")
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be at least 0, not {min_bytes}")
    return min_bytes


def _frames_read(frames: list[Any]) -> list[int]:
    """The indices of the frames of Dask's message `frames` that its reader
    deserializes as sub-frames of a serialized object (as
    ``distributed.protocol.core.loads`` walks them)."""
    import msgpack  # type: ignore[import-untyped]
    from distributed.protocol.utils import msgpack_opts

    offsets: list[int] = []

    def note(obj: dict[str, Any]) -> dict[str, Any]:
        offset = obj.get("__Serialized__", 0)
        if offset > 0:
            offsets.append(offset)
        return obj

    msgpack.loads(frames[0], object_hook=note, use_list=False, **msgpack_opts)
    read: list[int] = []
    for offset in offsets:
        sub_header = msgpack.loads(frames[offset], use_list=False, **msgpack_opts)
        read.extend(range(offset + 1, offset + 1 + sub_header["num-sub-frames"]))
    return read


def _wrap_tcp_write() -> None:
    from distributed.comm import tcp
    from distributed.comm.tcp import TCP

    original = TCP.write
    original_to_frames = tcp.to_frames

    @functools.wraps(original_to_frames)
    async def to_frames(msg: Any, *args: Any, **kwargs: Any) -> list[Any]:
        # When msgpack cannot encode part of a message, Dask serializes the
        # whole message again (with a pickle fallback), keeping the frames of
        # the first try in the list: they go out, but no reader looks at
        # them. A copy is sent only if its frame is one the header points
        # to (each copy's frame names its own block: no two are equal).
        made = _in_flight.get()
        start = len(made) if made is not None else 0
        frames: list[Any] = await original_to_frames(msg, *args, **kwargs)
        # (A lone copy is always read: a second try would have made another.)
        if made is not None and len(made) - start > 1:
            read = {bytes(frames[i]) for i in _frames_read(frames)}
            sent = [m for m in made[start:] if m[0] in read]
            if len(sent) < len(made) - start:
                _take_back([m for m in made[start:] if m[0] not in read])
                made[start:] = sent
        return frames

    @functools.wraps(original)
    async def write(self: TCP, *args: Any, **kwargs: Any) -> int:
        # Serialization happens inside (possibly in Dask's offload thread,
        # which runs in a copy of this context: it sees the same list).
        with _sending():
            n: int = await original(self, *args, **kwargs)
            return n

    TCP.write = write  # type: ignore[method-assign]
    tcp.to_frames = to_frames


def _wrap_get_data(worker: Any) -> None:
    """A worker's get_data waits for the recipient's "OK" after its write:
    if that fails, the private copies it sent may never have been loaded."""
    original = worker.handlers.get("get_data")
    if original is None or getattr(original, "_pyarraypool", False):
        return

    @functools.wraps(original)  # Dask reads the handler's signature
    async def get_data(*args: Any, **kwargs: Any) -> Any:
        with _sending():
            return await original(*args, **kwargs)

    get_data._pyarraypool = True  # type: ignore[attr-defined]
    worker.handlers["get_data"] = get_data


def _install_here(remote_as_pool: bool | None, min_bytes: int | None = None) -> None:
    """Registers the serializers and the handshake in this process (idempotent).

    ``min_bytes`` sets auto mode (None: off) every time."""
    global _installed, _remote_as_pool, _original_dask_dumps, _original_ndarray_loads
    global _original_handshake_info, _original_dask_pickle_dumps, _auto_min_bytes
    min_bytes = _check_min_bytes(min_bytes)
    with _lock:
        _remote_as_pool = _env_remote_as_pool() if remote_as_pool is None else bool(remote_as_pool)
        _auto_min_bytes = min_bytes
        if _installed:
            return
        # Deserializer first, then the serializer, then the handshake: a peer
        # learns our identity only once we can load what it will send us.
        _original_ndarray_loads = dask_deserialize.dispatch(np.ndarray)
        dask_deserialize.register(np.ndarray)(_loads_ndarray)
        dask_deserialize.register(TransferableArray)(_loads_handle)
        dask_deserialize.register(_PrivateCopy)(_loads_private_copy)
        _wrap_tcp_write()
        dumps, loads, _ = families["dask"]
        _original_dask_dumps = dumps
        register_serialization_family("dask", _dumps, loads)
        _original_dask_pickle_dumps = _dask_pickle.dumps
        _dask_pickle.dumps = _dask_pickle_dumps
        copyreg.pickle(TransferableArray, _reduce_transferable)
        _original_handshake_info = Comm.handshake_info
        Comm.handshake_info = _handshake_info  # type: ignore[method-assign]
        _installed = True
    # Attach now: workers started by this program look for this pool to join.
    _own_identity()


# -- the pool of a cluster's host ---------------------------------------------


def _in_initial_environment(name: str, value: str) -> bool:
    """Whether `name=value` was in this process's environment when it started."""
    try:
        with open("/proc/self/environ", "rb") as f:
            initial = f.read().split(b"\0")
    except OSError:
        return True  # cannot tell: take the name as given
    return f"{name}={value}".encode() in initial


def _note_random_pool_name() -> None:
    # `import pyarraypool` picks a random pool name when none was given; mark
    # it as such for this process's children. A worker must keep a name given
    # on purpose (exported by the user, or by the program that started it and
    # uses that pool) but not one its nanny drew only because it imported
    # this module to check the preload.
    name = os.environ.get(_lifecycle.ENV_POOL, "")
    if name and not _in_initial_environment(_lifecycle.ENV_POOL, name):
        os.environ[ENV_RANDOM_POOL] = name


def _keeps_its_pool_name() -> bool:
    name = os.environ.get(_lifecycle.ENV_POOL, "")
    if not name:
        return False
    if os.environ.get(ENV_RANDOM_POOL) != name:
        return True  # given on purpose
    # Drawn at random by an ancestor: keep it only if that pool is in use
    # (a LocalCluster in a client program that installed this module).
    return _core._inspect(name) is not None


#: The per-user secret of `dask worker --preload` workers (see _host_secret).
SECRET_FILE = "dask-secret"


def _private_dir() -> str:
    """A directory of this user that no other user can read or write:
    ``$XDG_RUNTIME_DIR/pyarraypool`` (per host, per login) if there is one,
    else ``~/.cache/pyarraypool``. Raises PoolError if it is not private."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = runtime if runtime and os.path.isdir(runtime) else os.path.join(
        os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "pyarraypool")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise _core.PoolError(
            f"{path} must be a directory of uid {os.geteuid()} that no other user can open "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    return path


def _host_secret() -> str:
    """This user's secret for the cluster pools of workers that nobody told
    one (``--preload``): 128 random bits in a mode-0600 file of a private
    directory, made by the first worker and read by the others."""
    path = os.path.join(_private_dir(), SECRET_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            # Written in full under a private name, then linked: another
            # worker never reads half a secret, and one of two racing wins.
            tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, secrets.token_hex(16).encode())
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_mode & 0o077):
                raise _core.PoolError(f"{path} must be a file of uid {os.geteuid()} with mode 0600")
            value = f.read(64).decode("ascii", "replace").strip()
        if len(value) == 32:
            return value
        raise _core.PoolError(f"{path} does not hold a secret (32 hex digits)")
    raise _core.PoolError(f"cannot create {path}")


def cluster_pool_name(scheduler_address: str, secret: str | None = None) -> str:
    """The pool name the workers of one scheduler share on each host.

    A hash of the scheduler's address as the worker names it, the user id and
    a secret, so that every worker of a host joins one pool without being
    told, and another user of the host cannot compute the name (and so
    cannot create files under it first). ``secret`` is the one
    ``install(client)`` sends every worker in its plugin; None uses this
    user's secret file (``$XDG_RUNTIME_DIR/pyarraypool/dask-secret``, else
    ``~/.cache/pyarraypool/dask-secret``, made on first use), as
    ``dask worker --preload pyarraypool.dask`` does.
    """
    if secret is None:
        secret = _host_secret()
    seed = f"pyarraypool-dask\0{scheduler_address}\0{os.getuid()}\0{secret}".encode()
    return hashlib.sha256(seed).hexdigest()[:32]


def _join_cluster_pool(scheduler_address: str, secret: str | None = None) -> None:
    if _core._pool_token() is not None:
        return  # already uses a pool: it cannot change now
    if _keeps_its_pool_name():
        return
    try:
        name = cluster_pool_name(scheduler_address, secret)
    except (OSError, _core.PoolError) as e:
        # No private place for the secret: this worker keeps a pool of its
        # own (arrays reach it by value) rather than a name others can guess.
        logger.warning("pyarraypool.dask: not joining the host's cluster pool: %s", e)
        return
    os.environ[_lifecycle.ENV_POOL] = name
    # The workers sharing this pool are separate programs, and the root this
    # one inherited (its nanny, which never uses the pool) must not keep the
    # pool for handles in flight once every worker has left it.
    os.environ[_lifecycle.ENV_ROOT] = _lifecycle.NO_ROOT


class PyArrayPoolPlugin(WorkerPlugin):
    """Installs pyarraypool.dask in every worker, now and after restarts.

    ``install(client)`` registers it; ``client.register_plugin(PyArrayPoolPlugin())``
    does the same for the workers only. A worker that has not used a pool
    yet, and whose pool name was drawn at random rather than given (by the
    user, or by a client program that started it and uses that pool), joins
    its host's cluster pool (:func:`cluster_pool_name`), named with a secret
    drawn when the plugin is made and sent to the workers inside it (a
    plugin made by ``dask_setup``, for ``--preload``, uses the user's secret
    file instead). ``remote_as_pool`` (default: the
    ``PYARRAYPOOL_DASK_REMOTE_AS_POOL`` variable) copies pool arrays that
    arrive by value into the worker's pool. ``min_bytes`` turns auto mode on
    (see :func:`install`); removing the plugin turns it off.
    """

    name = "pyarraypool"
    # Registering again replaces the plugin in every worker: a new
    # min_bytes must reach them.
    idempotent = False

    def __init__(self, remote_as_pool: bool | None = None, *,
                 secret: str | None = "random", min_bytes: int | None = None) -> None:
        self.remote_as_pool = remote_as_pool
        self.min_bytes = _check_min_bytes(min_bytes)
        # The cluster pool's secret travels with the plugin: every worker
        # the scheduler gives this plugin agrees on one pool per host.
        self.secret = secrets.token_hex(16) if secret == "random" else secret

    def setup(self, worker: Any) -> None:
        _join_cluster_pool(worker.scheduler.address, self.secret)
        _install_here(self.remote_as_pool, self.min_bytes)
        _wrap_get_data(worker)

    def teardown(self, worker: Any) -> None:
        global _auto_min_bytes
        with _lock:
            _auto_min_bytes = None


#: The cluster pool secret of the plugins this process registers: one per
#: process, so that installing again (another min_bytes) keeps every
#: worker, old or joining later, on the same cluster pool.
_plugin_secret = secrets.token_hex(16)


def install(client: Any = None, *, remote_as_pool: bool | None = None,
            min_bytes: int | None = None) -> Any:
    """Sends pool arrays by handle between processes that share a pool.

    Installs in this process and, given a ``distributed.Client``, in every
    worker of its cluster (a :class:`PyArrayPoolPlugin`, kept for workers
    that join or restart later). Returns what ``client.register_plugin``
    returns (an awaitable for an asynchronous client), or None.

    ``remote_as_pool``: arrays that arrive by value (from another host) become
    pool arrays in the receiving process instead of plain ndarrays; None
    reads ``PYARRAYPOOL_DASK_REMOTE_AS_POOL``. Given with a client, it applies
    to the workers too.

    ``min_bytes``: auto mode. A plain ndarray (exact type ``np.ndarray``:
    dask.array chunks, task results, scattered data) of at least this many
    bytes that goes to a process sharing the sender's pool is copied once into
    the pool and sent as a private handle; the recipient gets a plain ndarray
    that lives in the pool, its own (the sender's later writes do not reach
    it), until it drops it. Smaller arrays, other types, arrays of dtypes the
    pool cannot hold, arrays to other hosts and spilling are unchanged; a full
    pool sends by value. None (the default) turns auto mode off: calling
    ``install(client)`` again goes back to pool arrays only. Raises TypeError
    or ValueError for a ``min_bytes`` that is not an int >= 0.
    """
    _install_here(remote_as_pool, min_bytes)
    if client is None:
        return None
    plugin = PyArrayPoolPlugin(remote_as_pool, secret=_plugin_secret, min_bytes=min_bytes)
    if client.asynchronous:
        return _install_on_cluster_async(client, plugin)
    client.register_plugin(plugin, name="pyarraypool")
    _gather_directly_if_shared(client, client.run(_own_identity))
    return None


async def _install_on_cluster_async(client: Any, plugin: PyArrayPoolPlugin) -> None:
    await client.register_plugin(plugin, name="pyarraypool")
    _gather_directly_if_shared(client, await client.run(_own_identity))


def _gather_directly_if_shared(client: Any, worker_pools: dict[str, Any]) -> None:
    # The scheduler relays by value (see _is_scheduler_comm): results reach
    # the client by handle only straight from a worker. Workers that share
    # the client's pool run on its host, so they are reachable directly.
    own = _own_identity()
    if client.direct_to_workers is None and any(_same_pool(p, own) for p in worker_pools.values()):
        client.direct_to_workers = True


def dask_setup(server: Any) -> None:
    """Entry point of ``dask worker --preload pyarraypool.dask``."""
    from distributed import Worker

    if isinstance(server, Worker):
        PyArrayPoolPlugin(secret=None).setup(server)  # the user's secret file
    else:
        # A scheduler or nanny only relays data; installing there would make a
        # scheduler forward handles to clients that may be on other hosts.
        logger.info("pyarraypool.dask: nothing to do in a %s", type(server).__name__)


_note_random_pool_name()
