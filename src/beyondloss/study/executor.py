"""Where a study's runs execute: the one process pool every study uses.

A study hands its executor a list of calls ``(fn, *args)`` — module-level functions and
picklable arguments, so that any backend can ship them — and gets their results back in order.
:class:`LocalExecutor` is the embedded default: ``workers`` spawned processes with one torch
thread each (runs stay bitwise reproducible and do not contend), or the calling process itself
with ``workers=0``. A distributed backend is one more class with the same :meth:`run`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol

import torch
from tqdm import tqdm

Call = tuple[Any, ...]
"""``(fn, *args)``: ``fn(*args)`` is what runs."""


class Executor(Protocol):
    """What a study needs of an executor (used as a context manager around its calls)."""

    def run(
        self,
        calls: Sequence[Call],
        names: Sequence[str],
        desc: str,
        progress: bool = True,
        total: int | None = None,
        on_result: OnResult | None = None,
    ) -> list[Any]:
        """Results of ``fn(*args)`` for each call, in order; ``on_result(index, result)`` is
        called in this process as each call finishes."""
        ...


class LocalExecutor:
    """Calls run in ``workers`` spawned processes (``0``: in this process), under a progress bar.

    Use as a context manager; on an error inside the block, pending calls are cancelled instead
    of waited for, and on ``KeyboardInterrupt`` the workers are stopped at once (they ignore
    SIGINT themselves, so a Ctrl-C reaches the study once, not once per worker).
    """

    def __init__(self, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            if interrupted:
                # No public way to stop running calls before Python 3.14's terminate_workers().
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
            # Joined after an interrupt too: its workers are gone, so that is prompt.
            self._pool.shutdown(wait=error is None or interrupted, cancel_futures=error is not None)
            self._pool = None

    def run(
        self,
        calls: Sequence[Call],
        names: Sequence[str],
        desc: str,
        progress: bool = True,
        total: int | None = None,
        on_result: OnResult | None = None,
    ) -> list[Any]:
        """Results of ``fn(*args)`` for each call, in order, under a bar over ``total`` items of
        which ``len(calls)`` are still to do; ``on_result(index, result)`` as each finishes. A
        failure is raised as ``RuntimeError`` naming the call by ``names``."""
        if self._pool is None:
            done: Iterable[tuple[int, Getter]] = (
                (i, _now(call).result) for i, call in enumerate(calls)
            )
        else:
            with _sigint_ignored():  # the workers this spawns inherit SIG_IGN
                futures = {self._pool.submit(*call): i for i, call in enumerate(calls)}
            done = ((futures[future], future.result) for future in as_completed(futures))
        return collect(done, len(calls), names, desc, progress, total, on_result)


Getter = Callable[[], Any]
"""A finished call's result: returns it, or raises the call's exception."""

OnResult = Callable[[int, Any], None]
"""Called with ``(index, result)`` in the calling process as each call finishes."""


def collect(
    done: Iterable[tuple[int, Getter]],
    count: int,
    names: Sequence[str],
    desc: str,
    progress: bool = True,
    total: int | None = None,
    on_result: OnResult | None = None,
) -> list[Any]:
    """The results of ``count`` calls, in call order, from ``done`` (``(index, getter)`` pairs
    as the calls finish), each handed to ``on_result`` as it arrives, under a bar over
    ``total`` items of which ``count`` are still to do; the first failure is raised as
    ``RuntimeError`` naming the call by ``names``. Every executor's :meth:`run` ends here."""
    total = count if total is None else total
    results: list[Any] = [None] * count
    with tqdm(total=total, initial=total - count, desc=desc, disable=not progress) as bar:
        for i, result in done:
            try:
                results[i] = result()
            except Exception as error:
                raise RuntimeError(f"{desc} {names[i]} failed: {error}") from error
            if on_result is not None:
                on_result(i, results[i])
            bar.update()
    return results


def _now(call: Call) -> Future:
    """``fn(*args)`` run now, as a finished future."""
    future: Future = Future()
    try:
        future.set_result(call[0](*call[1:]))
    except Exception as error:
        future.set_exception(error)
    return future


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process while the block runs (on the main thread; elsewhere a
    no-op): processes started meanwhile inherit it from before their interpreter starts, so a
    Ctrl-C that reaches the whole process group cannot interrupt a worker while it imports."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_worker() -> None:
    """One torch thread per worker: runs stay bitwise reproducible and workers don't contend.
    A worker ignores SIGINT: a Ctrl-C at the terminal reaches the whole process group, and the
    study (which stops its workers) answers it. On Linux a worker also dies with the study that
    started it, so that a killed study leaves no orphan writing over the checkpoints of the runs
    its restart resumes."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore, which a worker stopped by a Ctrl-C
    # could not release (the resource tracker would then warn of a leak): a thread lock does.
    tqdm.set_lock(threading.RLock())
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal this process gets when its parent dies."""
