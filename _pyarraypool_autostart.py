"""Auto mode for unchanged programs: ``PYARRAYPOOL_AUTO`` and a post-import hook.

``pyarraypool_auto.pth`` (installed into site-packages) imports this module
at interpreter start only when ``PYARRAYPOOL_AUTO`` is set, so a program
without it pays one ``os.environ`` lookup. This module is top level, not in
the ``pyarraypool`` package, because importing the package loads numpy and
the extension: a program that never uses numpy must not pay for them.

Here we only watch imports. Once numpy and multiprocessing are both imported
(an array can then be sent to another process), ``import pyarraypool`` reads
the variable and turns auto mode on (``pyarraypool._auto``). The same
watcher tells ``pyarraypool._auto`` when joblib's or loky's picklers are
imported, and takes itself off ``sys.meta_path`` when nothing is waited for.

This module imports nothing beyond what the interpreter has already loaded
at start (sys, os, _thread), and never raises: a failure here must not stop
the program from starting.
"""

from __future__ import annotations

import _thread
import os
import sys

# Not `typing.TYPE_CHECKING`: importing typing at every interpreter start
# would cost more than everything else here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

ENV_AUTO = "PYARRAYPOOL_AUTO"
#: Values that leave auto mode off (compared lowercased and stripped).
OFF_VALUES = frozenset({"", "0", "off", "false", "no"})
#: Values that turn it on with the default threshold.
ON_VALUES = frozenset({"1", "on", "true", "yes"})

_lock = _thread.RLock()
# Each watch: [names still awaited (a set), callback]. A callback runs once,
# after the last of its names has finished importing.
_watches: list[list[Any]] = []


def _loaded(name: str) -> bool:
    """True if `name` is imported and has finished executing."""
    module = sys.modules.get(name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


def when_imported(names: Sequence[str], callback: Callable[[], None]) -> object:
    """Calls `callback()` once every module of `names` has been imported.

    At once if they already are; otherwise right after the last of them
    finishes executing (inside that import statement), or, for a module that
    is executing right now (this call comes from inside its import), at the
    first import after it has finished. Returns a token for `cancel`. An
    exception from a deferred `callback` becomes a RuntimeWarning: the
    import that triggered it must not fail.
    """
    with _lock:
        waiting = {n for n in names if not _loaded(n)}
        if not waiting:
            watch = None
        else:
            watch = [waiting, callback]
            _watches.append(watch)
            _update()
    if watch is None:
        callback()
    return watch


def cancel(token: object) -> None:
    """Forgets a watch that `when_imported` returned (no-op if it already ran)."""
    with _lock:
        for i, watch in enumerate(_watches):
            if watch is token:
                del _watches[i]
                break
        _update()


# True while a watched module is executing and we did not wrap its loader (it
# started before the watch): the finder then looks at each import whether it
# has finished. A flag, so that the usual find_spec costs no scan.
_polling = False


def _update() -> None:
    """Under _lock: the finder is on sys.meta_path exactly while a watch waits."""
    global _polling
    _polling = any(n in sys.modules for watch in _watches for n in watch[0])
    if _watches:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    else:
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass


def _finished(name: str) -> None:
    """Called right after module `name` executed (its spec still says initializing)."""
    with _lock:
        for watch in _watches:
            watch[0].discard(name)
    _poll()


def _poll() -> None:
    """Runs the watches whose modules have all finished executing."""
    ready = []
    with _lock:
        for watch in list(_watches):
            awaited = watch[0]
            awaited.difference_update([n for n in awaited if _loaded(n)])
            if not awaited:
                _watches.remove(watch)
                ready.append(watch[1])
        _update()
    for callback in ready:
        try:
            callback()
        except Exception as exc:  # the import that triggered it must still succeed
            import warnings

            warnings.warn(f"pyarraypool auto mode: {exc!r}", RuntimeWarning, stacklevel=2)


class _Loader:
    """Wraps a module's real loader to learn when the module has executed.

    Only `exec_module` is ours; everything else is the real loader's. Once
    the module has executed, its `__loader__` and `__spec__.loader` are the
    real loader again, so nothing after the import can tell we were there.
    """

    def __init__(self, loader: Any, name: str) -> None:
        self._pap_loader = loader
        self._pap_name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._pap_loader, attr)

    def create_module(self, spec: Any) -> Any:
        return self._pap_loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self._pap_loader.exec_module(module)
        finally:
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._pap_loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._pap_loader
        _finished(self._pap_name)


class _Finder:
    """First on sys.meta_path while a watch waits; finds nothing itself.

    For a watched name, it asks the finders after it for the spec and wraps
    the spec's loader; for every other name it costs a set lookup.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if _polling:
            _poll()
        with _lock:
            if not any(fullname in watch[0] for watch in _watches):
                return None
            finders = list(sys.meta_path)
        try:
            rest = finders[finders.index(self) + 1 :]
        except ValueError:
            rest = finders
        for finder in rest:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if loader is not None and hasattr(loader, "exec_module"):
                spec.loader = _Loader(loader, fullname)
            return spec
        return None

    def invalidate_caches(self) -> None:
        pass


_finder = _Finder()


def _start() -> None:
    """numpy and multiprocessing are imported: ``import pyarraypool`` reads the variable."""
    try:
        import pyarraypool  # noqa: F401  (its import turns auto mode on)
    except Exception as exc:  # a broken install must not break the program
        import warnings

        warnings.warn(
            f"{ENV_AUTO} is set but pyarraypool could not be imported ({exc!r}); "
            "arrays go by value",
            RuntimeWarning,
            stacklevel=2,
        )


def _main() -> None:
    raw = os.environ.get(ENV_AUTO)
    if raw is None or raw.strip().lower() in OFF_VALUES:
        return
    when_imported(("numpy", "multiprocessing"), _start)


try:
    _main()
except Exception:  # never stop the interpreter from starting
    pass
