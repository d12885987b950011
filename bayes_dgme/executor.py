"""One executor for independent tasks: in this process, on local processes, or on a Dask cluster.

Studies (one task per cell) and the deviation test's bootstrap (one task per chunk of replicates) run
through `executor`; nothing else in the package creates process pools or Dask clients.

Workers never outlive the process that started them:

* local worker processes are *spawned* (no fork of a process whose threads may hold locks) and, on
  start, ask the kernel to kill them when their parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on
  Linux) and watch ``os.getppid()`` in a daemon thread (every platform) -- so a SIGKILL of the parent
  leaves no worker, and then no ``multiprocessing`` resource tracker (it exits when the last holder of
  its pipe is gone);
* while tasks run, SIGTERM in the main thread raises `SystemExit` (exit status 143), which kills the
  workers at once instead of waiting for their running tasks;
* Dask ``LocalCluster`` workers exit by themselves when their parent dies (``distributed`` watches a
  pipe to the parent), and the cluster is closed when the executor closes.

Dask is optional (``pip install 'bayes_dgme[dask]'``) and imported only when a ``cluster`` is given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .validation import check_int

__all__ = ["Executor", "executor", "check_cluster", "MissingExtraError", "DASK_MISSING"]

#: The one-line message when ``cluster=`` is used without ``dask.distributed``.
DASK_MISSING = "--cluster needs the dask extra: pip install 'bayes_dgme[dask]'"

#: Seconds between two checks of the parent's pid in a worker.
_PARENT_POLL = 0.5


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is needed for what was asked (a `ValueError` too, so the CLI prints one line)."""


def check_cluster(cluster: Any) -> None:
    """`ValueError` naming ``cluster`` unless it is None, ``"local"``, ``"tcp://HOST:PORT"`` or a Dask ``Client``.

    A cluster without ``dask.distributed`` installed raises `MissingExtraError` here, before any work.
    """
    if cluster is None:
        return
    if isinstance(cluster, str) and (cluster == "local" or "://" in cluster):
        _distributed()
        return
    if isinstance(cluster, str):
        raise ValueError(f"cluster: expected None, 'local' or a scheduler address tcp://HOST:PORT, got {cluster!r}")
    if type(cluster).__name__ != "Client":
        raise ValueError(f"cluster: expected None, 'local', an address or a distributed.Client, got {cluster!r}")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise MissingExtraError(DASK_MISSING) from None
    return distributed


# ------------------------------------------------------------------------------------------ workers
def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when ``parent`` (the process that spawned it) ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="bayes_dgme-parent-watch", daemon=True).start()


class _Terminated(SystemExit):
    """SIGTERM while tasks run (exit status 128 + 15)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread: SIGTERM raises `_Terminated` (so that workers are killed on the way out)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ executors
class Executor:
    """Runs a function over items; a context manager (use ``with executor(...) as ex``).

    ``as_completed(fn, items)`` yields results as tasks finish (any order); ``map(fn, items)``
    returns them in the order of ``items``. ``fn`` and the items must be picklable unless the
    executor runs in this process (``kind == "serial"``).
    """

    kind = "serial"
    workers = 1

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # an error, SIGTERM or Ctrl-C: do not wait for running tasks
            self.abort()

    def close(self) -> None:
        """Release the workers after their running tasks (nothing to do in this process)."""

    def abort(self) -> None:
        """Release the workers now, losing running tasks."""
        self.close()

    def as_completed(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """Results of ``fn(item)`` in the order the tasks finish."""
        for item in items:
            yield fn(item)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """Results of ``fn(item)`` in the order of ``items``."""
        indexed = list(enumerate(items))
        out: list[Any] = [None] * len(indexed)
        for i, value in self.as_completed(_Indexed(fn), indexed):
            out[i] = value
        return out


class _Indexed:
    """``(i, item) -> (i, fn(item))`` (picklable when ``fn`` is)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, pair: tuple[int, Any]) -> tuple[int, Any]:
        return pair[0], self.fn(pair[1])


class _ProcessPool(Executor):
    kind = "processes"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def _start(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_die_with_parent, initargs=(os.getpid(),))
        return self._pool

    def as_completed(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        pool = self._start()
        with _sigterm_raises():
            pending = {pool.submit(fn, item) for item in items}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
            except BaseException:
                self.abort()
                raise
            finally:
                for fut in pending:
                    fut.cancel()

    def abort(self) -> None:
        """Kill the workers now (running tasks are lost; used on errors, SIGTERM and Ctrl-C)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()
        with contextlib.suppress(Exception):
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _Dask(Executor):
    kind = "dask"

    def __init__(self, cluster: Any, workers: int) -> None:
        distributed = _distributed()
        self.workers = workers
        self._owned: list[Any] = []
        if isinstance(cluster, str) and cluster == "local":
            lc = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                          dashboard_address=None)
            self._owned.append(lc)
            self.client = distributed.Client(lc)
            self._owned.insert(0, self.client)
        elif isinstance(cluster, str):
            try:
                self.client = distributed.Client(cluster, timeout="20s")
            except OSError as err:
                raise ValueError(f"cluster: cannot connect to the Dask scheduler at {cluster!r} ({err})") from None
            self._owned.append(self.client)
        else:
            self.client = cluster

    def as_completed(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        distributed = _distributed()
        futures = [self.client.submit(fn, item, pure=False) for item in items]
        with _sigterm_raises():
            try:
                for fut in distributed.as_completed(futures):
                    yield fut.result()
            finally:
                for fut in futures:
                    if not fut.done():
                        fut.cancel()

    def close(self) -> None:
        owned, self._owned = self._owned, []
        for obj in owned:
            with contextlib.suppress(Exception):
                obj.close()


def executor(cluster: Any = None, workers: int | None = 1) -> Executor:
    """The executor for ``cluster`` and ``workers``.

    Parameters
    ----------
    cluster : None, "local", "tcp://HOST:PORT" or distributed.Client
        ``None``: local processes (``workers > 1``) or this process (``workers == 1``).
        ``"local"``: a `dask.distributed.LocalCluster` of ``workers`` single-threaded worker processes,
        closed with the executor. An address: a `dask.distributed.Client` connected to that scheduler
        (its workers must import ``bayes_dgme``). A ``Client``: used as is (not closed).
    workers : int or None
        Number of local processes or LocalCluster workers (``None``: the number of CPUs).

    Returns
    -------
    Executor
        Use it as a context manager; ``as_completed(fn, items)`` and ``map(fn, items)``.

    Raises
    ------
    ValueError
        Bad ``cluster`` or ``workers`` (naming the field), or no Dask scheduler at the address.
    MissingExtraError
        ``cluster`` given but ``dask.distributed`` is not installed (also a `ValueError`).
    """
    check_cluster(cluster)
    workers = (os.cpu_count() or 1) if workers is None else check_int("workers", workers, 1)
    if cluster is not None:
        return _Dask(cluster, workers)
    if workers == 1:
        return Executor()
    return _ProcessPool(workers)
