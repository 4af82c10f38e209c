"""A study's runs as Ray tasks, behind the interface of the local pool
(:class:`~beyondloss.study.executor.LocalExecutor`).

Each call ``(fn, *args)`` becomes one Ray task with ``cpus_per_run`` CPUs (and
``gpus_per_run`` GPUs), running ``fn(*args)`` with that many torch threads, so that a run on
Ray computes exactly what it computes in the local pool. A task whose worker process dies (a
SIGKILL, a node leaving the cluster) is retried by Ray up to ``max_retries`` times; a study's
run then resumes from its last checkpoint, which must therefore lie on storage that every node
sees. Exceptions raised by ``fn`` are not retried: they are errors, reported by name.

Needs the optional ``ray`` extra (``pip install 'beyondloss[ray]'``). ``address=None`` starts
a Ray instance inside this process for the executor's lifetime; ``"auto"`` or
``"ray://host:port"`` joins a running cluster (``ray start --head`` ...), which it leaves
running.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from beyondloss.study.executor import Call, Getter, OnResult, collect


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'beyondloss[ray]'") from None
    return ray


def _call_with_threads(threads: int, call: Call) -> Any:
    """``fn(*args)`` of ``call`` with ``threads`` torch threads (runs inside a Ray worker)."""
    import torch

    torch.set_num_threads(threads)
    return call[0](*call[1:])


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ``ConnectionError`` at once if nothing listens at ``address`` (``host:port`` or
    ``ray://host:port``; ``"auto"`` is left to Ray), where Ray itself would retry for
    minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {address}: {error}") from None


class RayExecutor:
    """Calls run as Ray tasks, under a progress bar over the calls finished.

    Parameters
    ----------
    address:
        Cluster to join (``"auto"``, ``"ray://host:port"``, ``"host:port"``); ``None`` starts a
        local instance with ``num_cpus`` CPUs (all of the machine's if ``None``).
    cpus_per_run, gpus_per_run:
        Resources of each task; ``cpus_per_run`` is also its number of torch threads.
    max_retries:
        Retries of a task whose worker died (not of one that raised).
    num_cpus:
        CPUs of a local instance (ignored when joining a cluster).
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: int = 1,
        gpus_per_run: float = 0,
        max_retries: int = 3,
        num_cpus: int | None = None,
    ) -> None:
        for name, value in (("cpus_per_run", cpus_per_run), ("max_retries", max_retries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if cpus_per_run < 1:
            raise ValueError(f"cpus_per_run must be >= 1, got {cpus_per_run}")
        if not gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run}")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self._ray: Any = None
        self._started = False

    def __enter__(self) -> RayExecutor:
        ray = _import_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus
            else:
                check_reachable(self.address)
            ray.init(address=self.address, **options)
            self._started = True
        self._ray = ray
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
        self._ray = None

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
        which ``len(calls)`` are still to do; ``on_result(index, result)`` in this process as
        each finishes. A failure is raised as ``RuntimeError`` naming the call by ``names``;
        the other tasks are cancelled."""
        if self._ray is None:
            raise RuntimeError("use RayExecutor as a context manager: with RayExecutor() as ex")
        ray = self._ray
        task = ray.remote(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )(_call_with_threads)
        refs = [task.remote(self.cpus_per_run, call) for call in calls]
        try:
            return collect(
                _finished(ray, refs), len(calls), names, desc, progress, total, on_result
            )
        except RuntimeError:
            _cancel_unfinished(ray, refs)
            raise


def _cancel_unfinished(ray: Any, refs: Sequence[Any]) -> None:
    """Cancel the tasks of ``refs`` that have not finished.

    Not with ``force=True``: Ray 2.60 marks a force-cancelled task failed at once, and when the
    task's own reply is already on its way the driver aborts on a failed internal check ("Tried
    to complete task that was not pending"), killing the study. A plain cancel interrupts the
    task's Python code with ``KeyboardInterrupt`` and waits for the worker's reply."""
    _, unfinished = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in unfinished:
        ray.cancel(ref)


def _finished(ray: Any, refs: Sequence[Any]) -> Iterator[tuple[int, Getter]]:
    """``(index, getter)`` of each task in ``refs`` as it finishes; a getter raises the
    exception the task's function raised (not Ray's wrapper of it)."""
    index = {ref: i for i, ref in enumerate(refs)}
    waiting = list(refs)
    while waiting:
        [ready], waiting = ray.wait(waiting, num_returns=1)

        def result(ref: Any = ready) -> Any:
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise (error.cause or error) from None

        yield index[ready], result
