"""One run on several processes: :func:`launch` runs ``fn(*args)`` on ``nprocs`` local ranks
joined in one ``torch.distributed`` process group, so that :func:`beyondloss.train.train`
inside ``fn`` trains data-parallel.

Each rank is a process spawned by ``torch.multiprocessing``, with one torch thread, joined
through a file rendezvous (``file://``, no port to choose) on the ``gloo`` backend, with
``nccl`` for CUDA tensors where CUDA is available. When a rank dies (a SIGKILL, the OOM
killer), ``torch.multiprocessing`` stops the others at once, and :func:`launch` starts all
``nprocs`` again in a fresh group, up to ``max_restarts`` times — what ``torchrun
--max-restarts`` does — so that a run that checkpoints (``train(..., run_dir=...)``) resumes
from its last checkpoint. A rank that *raises* is an error, not retried.

Why not ``torchrun``'s own agent (``torch.distributed.launcher.elastic_launch``): in torch 2.13
on CPU its restarted groups now and then failed to connect (``Gloo connectFullMesh failed``) or
hung for minutes after a rank was SIGKILLed; a fresh file rendezvous per attempt does not.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULT_NAME = "result.pkl"
"""File in the launch's temporary folder where rank 0 leaves ``fn``'s result."""


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int,
    max_restarts: int = 3,
    timeout: timedelta = timedelta(minutes=30),
) -> Any:
    """Rank 0's result of ``fn(*args)`` run on ``nprocs`` ranks (``fn``, ``args`` and the
    result must pickle: the ranks are spawned).

    A rank that dies restarts all of them, at most ``max_restarts`` times; then, or when a rank
    raises, ``RuntimeError`` names the rank and its error. ``timeout`` bounds how long a
    collective waits for a peer (an evaluation on rank 0 keeps the others waiting).
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an integer >= 1, got {nprocs!r}")
    with tempfile.TemporaryDirectory(prefix="beyondloss-ranks-") as folder:
        for attempt in range(max_restarts + 1):
            rendezvous = Path(folder) / f"rendezvous-{attempt}"
            try:
                mp.start_processes(
                    _rank_main,
                    args=(nprocs, str(rendezvous), timeout, folder, fn, args),
                    nprocs=nprocs,
                    start_method="spawn",
                )
            except mp.ProcessRaisedException as error:
                last = str(error).strip().splitlines()[-1]
                raise RuntimeError(f"rank {error.error_index} raised {last}") from error
            except mp.ProcessExitedException as error:
                if attempt == max_restarts:
                    raise RuntimeError(
                        f"ranks died {max_restarts + 1} times; the last time: {error}"
                    ) from None
                continue
            with open(Path(folder) / RESULT_NAME, "rb") as file:
                return pickle.load(file)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _rank_main(
    rank: int,
    world: int,
    rendezvous: str,
    timeout: timedelta,
    folder: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """Rank ``rank`` of ``world``: join the group, run ``fn(*args)``; rank 0 writes the result;
    then every rank leaves the group and ends (:func:`leave_group`)."""
    torch.set_num_threads(1)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timeout
    )
    result = fn(*args)
    if rank == 0:
        with open(Path(folder) / RESULT_NAME, "wb") as file:
            pickle.dump(result, file)
    leave_group()


def leave_group() -> NoReturn:
    """Leave the process group together and end this rank's process at once, with exit code 0.

    A barrier first, so that no rank closes its connections while a peer still uses them; then
    ``destroy_process_group``; then, after flushing stdout and stderr, ``os._exit(0)``, which
    skips the interpreter's shutdown. In that shutdown, gloo's background threads are sometimes
    still joinable when their owners are destroyed, and ``std::terminate`` aborts the rank
    ("terminate called without an active exception", SIGABRT): in 4 of 60 two-rank DDP spawns
    on torch 2.13 CPU, 0 of 60 with this exit. An aborted rank would make :func:`launch` run
    the whole group again from its last checkpoint. Call it last in a rank's entry point: nothing
    after it runs, and no ``atexit`` handler either, so close files first.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
