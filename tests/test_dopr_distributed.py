"""Under DDP every rank applies the same activation preconditioner as one process would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from distributed_ranks import WORLD_SIZE, finish_rank, init_rank
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from beyondloss.optim import make_optimizer

STEPS = 5


def make_model() -> nn.Module:
    """fp64, so that comparing summation orders is not swamped by fp32 conditioning of Σ + λI."""
    torch.manual_seed(0)
    layers = [nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)]
    return nn.Sequential(*layers).double()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], dim=1)


def train(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, handle=None) -> None:
    exact = {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}  # all-reduce on every step
    opt = make_optimizer(name, handle or model, lr=0.01, weight_decay=0.01, **exact)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss((handle or model)(x), y).backward()
        opt.step()


def worker(rank: int, name: str, init_file: str, out_dir: str) -> None:
    init_rank(rank, init_file)
    model = make_model()
    ddp = DistributedDataParallel(model)
    x, y = make_batch()
    shard = slice(rank * len(x) // WORLD_SIZE, (rank + 1) * len(x) // WORLD_SIZE)
    train(model, name, x[shard], y[shard], handle=ddp)
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finish_rank()


@pytest.mark.parametrize("name", ["sgd", "dopr-sgd", "dopr-adamw"])
def test_ranks_agree_and_match_one_process_on_the_concatenated_batch(
    name: str, tmp_path: Path
) -> None:
    mp.spawn(worker, args=(name, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    single = make_model()
    train(single, name, *make_batch())
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=1e-6)
