"""Weight-average evaluators: the averaged model judged by the deployment, on a cadence, and
resumed with its average from a checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.evaluation import WeightAverageEvaluator
from beyondloss.optim import make_optimizer
from beyondloss.posthoc.averaging import EMA, SWA
from beyondloss.train import TrainConfig, train

EPOCHS = 5


def make_run() -> tuple[nn.Module, torch.optim.Optimizer, TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=generator)
    y = torch.sin(x @ torch.tensor([[0.5], [-1.0], [0.25]]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = make_optimizer("dopr-adamw", model, lr=1e-2)
    return model, optimizer, TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def deployment(data: TensorDataset):
    def deploy(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"mse": float(mse(model, data.tensors))}

    return deploy


def evaluators(val: TensorDataset, every: int = 1) -> list:
    return [
        WeightAverageEvaluator("swa", SWA(start_epoch=3), {"val": deployment(val)}, every, EPOCHS),
        WeightAverageEvaluator("ema", EMA(0.5), {"val": deployment(val)}, every, EPOCHS),
    ]


def snapshot_recorder(snapshots: list):
    def record(model: nn.Module, epoch: int) -> dict[str, float]:
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {}

    return record


def test_the_averaged_model_is_judged_by_the_deployment() -> None:
    model, optimizer, data, val = make_run()
    snapshots: list = []
    history = train(
        model, optimizer, data, mse, TrainConfig(epochs=EPOCHS, batch_size=16, seed=1),
        [snapshot_recorder(snapshots), *evaluators(val)], progress=False,
    )
    swa = copy.deepcopy(model)
    state = {k: sum(s[k] for s in snapshots[2:]) / 3 for k in snapshots[0]}  # epochs 3, 4, 5
    swa.load_state_dict(state)
    assert history[-1]["swa_val_mse"] == pytest.approx(deployment(val)(swa)["mse"], rel=1e-5)
    ema_state = snapshots[0]
    for later in snapshots[1:]:
        ema_state = {k: 0.5 * ema_state[k] + 0.5 * later[k] for k in later}
    swa.load_state_dict(ema_state)
    assert history[-1]["ema_val_mse"] == pytest.approx(deployment(val)(swa)["mse"], rel=1e-5)
    assert "swa_val_mse" not in history[1]  # SWA starts at epoch 3


def test_cadence_evaluates_every_k_epochs_and_the_last() -> None:
    model, optimizer, data, val = make_run()
    history = train(
        model, optimizer, data, mse, TrainConfig(epochs=EPOCHS, batch_size=16, seed=1),
        evaluators(val, every=2), progress=False,
    )
    assert [("ema_val_mse" in record) for record in history] == [False, True, False, True, True]


def test_a_resumed_run_continues_with_its_weight_averages(tmp_path: Path) -> None:
    def run(epochs: int, run_dir: Path) -> list[dict[str, float]]:
        model, optimizer, data, val = make_run()
        config = TrainConfig(epochs=epochs, batch_size=16, seed=1)
        return train(model, optimizer, data, mse, config, evaluators(val), run_dir=run_dir,
                     progress=False)

    straight = run(EPOCHS, tmp_path / "straight")
    run(3, tmp_path / "resumed")  # the first three epochs, then a fresh process's objects
    resumed = run(EPOCHS, tmp_path / "resumed")
    for key in ("swa_val_mse", "ema_val_mse"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight]


def test_a_checkpoint_without_the_evaluators_state_is_refused(tmp_path: Path) -> None:
    model, optimizer, data, val = make_run()
    train(model, optimizer, data, mse, TrainConfig(epochs=2, batch_size=16, seed=1),
          run_dir=tmp_path, progress=False)
    model, optimizer, data, val = make_run()
    with pytest.raises(ValueError, match="holds the state of 0 of 0 evaluators"):
        train(model, optimizer, data, mse, TrainConfig(epochs=3, batch_size=16, seed=1),
              evaluators(val), run_dir=tmp_path, progress=False)
