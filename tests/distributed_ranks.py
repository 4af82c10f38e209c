"""Process-group set-up shared by the multi-process tests (DDP, FSDP2): 2 gloo ranks on CPU."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

WORLD_SIZE = 2


def init_rank(rank: int, init_file: str) -> None:
    """Join the gloo group through ``init_file``, one torch thread per rank; a collective that
    waits on a dead peer fails in a minute instead of hanging the suite."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )


def finish_rank() -> None:
    """Leave the group together: a barrier first, so that no rank closes its gloo connections
    while a peer still uses them (without it, a peer's gloo thread could abort the process with
    "terminate called without an active exception", about 1 run in 50)."""
    dist.barrier()
    dist.destroy_process_group()
