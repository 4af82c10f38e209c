"""Process-group set-up shared by the multi-process tests (DDP, FSDP2): 2 gloo ranks on CPU."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from beyondloss.distributed import leave_group

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
    """Leave the group together and end the rank's process with exit code 0
    (:func:`beyondloss.distributed.leave_group`, which says why it exits at once); call it
    last."""
    leave_group()
