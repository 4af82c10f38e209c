"""Tests of the training loop: learning, evaluators, store rows, checkpoints and exact resume.

Run as a script (``python test_train.py RUN_DIR DB OPTIMIZER``), this file is the worker of the
resume test: it trains the tiny run of :func:`_make_run` and kills its own process right after
the store rows of epoch 3 are committed, before that epoch's checkpoint is written.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.evaluation import StepAverageEvaluator
from beyondloss.optim.factory import make_optimizer
from beyondloss.posthoc.averaging import EMA
from beyondloss.schedules import LrMultiplier
from beyondloss.store import ResultsStore
from beyondloss.train import CHECKPOINT_NAME, Evaluator, TrainConfig, loss_evaluator, train

CONFIG = TrainConfig(epochs=4, batch_size=16, seed=3)
KILLED_AT_EPOCH = 3


def _make_run(optimizer_name: str) -> tuple[nn.Module, torch.optim.Optimizer, TensorDataset]:
    """A fixed tiny regression (64 samples, 3 inputs) and a freshly initialised dropout MLP."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 3, generator=generator)
    y = torch.sin(x @ torch.tensor([[0.5], [-1.0], [0.25]]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    optimizer = make_optimizer(optimizer_name, model, lr=1e-2, weight_decay=1e-2)
    return model, optimizer, TensorDataset(x, y)


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _rng_probe(model: nn.Module, epoch: int) -> dict[str, float]:
    """Draws from numpy's and Python's global RNGs, so their restore on resume is visible."""
    return {"numpy_draw": float(np.random.rand()), "python_draw": random.random()}


def _evaluators(data: TensorDataset) -> list[Evaluator]:
    return [loss_evaluator(_mse, data, batch_size=24), _rng_probe]


def _register(store: ResultsStore, run_id: str, optimizer_name: str) -> None:
    store.add_run(
        run_id, task="toy", optimizer=optimizer_name, lr=1e-2, weight_decay=1e-2, seed=CONFIG.seed
    )


class _DieAfterLogging(ResultsStore):
    """Store that ends the process the moment an epoch's rows are committed."""

    def __init__(self, path: Path, die_at: int) -> None:
        super().__init__(path)
        self.die_at = die_at

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        super().log_epoch(run_id, epoch, metrics)
        if epoch == self.die_at:
            os._exit(1)


SCHEDULED = TrainConfig(epochs=4, batch_size=16, seed=3, schedule="cosine", warmup=0.2)
"""The paper's protocol in small: warmup, cosine decay, and a per-step EMA (``_protocol``)."""


def _protocol_evaluators(data: TensorDataset) -> list[Evaluator]:
    """Val loss, the RNG probe and a per-step EMA of the weights, evaluated by its val loss."""
    ema = StepAverageEvaluator(
        "ema", EMA(0.9, warmup=True), {"val": lambda m: {"loss": _mse(m, data.tensors).item()}}
    )
    return [*_evaluators(data), ema]


def _killed_worker(run_dir: Path, db: Path, optimizer_name: str, protocol: str) -> None:
    torch.set_num_threads(1)
    model, optimizer, data = _make_run(optimizer_name)
    store = _DieAfterLogging(db, KILLED_AT_EPOCH)
    scheduled = protocol == "scheduled"
    train(
        model,
        optimizer,
        data,
        _mse,
        SCHEDULED if scheduled else CONFIG,
        (_protocol_evaluators if scheduled else _evaluators)(data),
        run_dir,
        store,
        "run",
        progress=False,
    )


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as in the worker, so every process computes the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_training_reduces_loss_on_tiny_regression() -> None:
    model, optimizer, data = _make_run("adamw")
    config = TrainConfig(epochs=15, batch_size=16)
    history = train(model, optimizer, data, _mse, config, _evaluators(data), progress=False)
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]


def test_evaluator_metrics_appear_in_history_and_store(tmp_path: Path) -> None:
    model, optimizer, data = _make_run("sgd")
    store = ResultsStore(tmp_path / "r.db")
    _register(store, "run", "sgd")
    config = TrainConfig(epochs=2, batch_size=16)
    history = train(
        model,
        optimizer,
        data,
        _mse,
        config,
        _evaluators(data),
        store=store,
        run_id="run",
        progress=False,
    )
    names = {"train_loss", "epoch_seconds", "val_loss", "numpy_draw", "python_draw"}
    assert all(h.keys() == names | {"epoch"} for h in history)
    curves = store.curves("run")
    assert curves.keys() == names | {"epoch"}
    assert curves["val_loss"] == [h["val_loss"] for h in history]
    assert store.is_complete("run")


@pytest.mark.parametrize("clashing_name", ["val_loss", "train_loss", "epoch_seconds"])
def test_metric_name_clash_raises(clashing_name: str) -> None:
    model, optimizer, data = _make_run("adamw")
    evaluators = [loss_evaluator(_mse, data), lambda model, epoch: {clashing_name: 0.0}]
    with pytest.raises(ValueError, match=clashing_name):
        train(
            model,
            optimizer,
            data,
            _mse,
            TrainConfig(epochs=1, batch_size=16),
            evaluators,
            progress=False,
        )


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model, optimizer, data = _make_run("adamw")
    history = train(
        model,
        optimizer,
        data,
        _mse,
        TrainConfig(epochs=2, batch_size=16),
        run_dir=tmp_path,
        progress=False,
    )
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert payload["epoch"] == 2
    assert payload["history"] == history
    _assert_bitwise_equal(payload["model"], model.state_dict())
    _assert_bitwise_equal(payload["optimizer"], optimizer.state_dict())
    assert not (tmp_path / (CHECKPOINT_NAME + ".tmp")).exists()


def test_finished_run_dir_is_not_trained_again(tmp_path: Path) -> None:
    model, optimizer, data = _make_run("adamw")
    config = TrainConfig(epochs=2, batch_size=16)
    history = train(model, optimizer, data, _mse, config, run_dir=tmp_path, progress=False)
    model_again, optimizer_again, _ = _make_run("adamw")
    again = train(
        model_again, optimizer_again, data, _mse, config, run_dir=tmp_path, progress=False
    )
    assert again == history
    _assert_bitwise_equal(model_again.state_dict(), model.state_dict())


def test_resume_with_a_different_batch_size_raises(tmp_path: Path) -> None:
    model, optimizer, data = _make_run("adamw")
    train(
        model,
        optimizer,
        data,
        _mse,
        TrainConfig(epochs=1, batch_size=16),
        run_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="batch_size"):
        train(
            model,
            optimizer,
            data,
            _mse,
            TrainConfig(epochs=2, batch_size=8),
            run_dir=tmp_path,
            progress=False,
        )


@pytest.mark.parametrize(
    ("optimizer_name", "protocol"),
    [
        ("adamw", "constant"),
        ("sgd", "constant"),
        ("dopr-adamw", "constant"),
        ("dopr-muon", "constant"),
        ("dopr-adamw", "scheduled"),
        ("muon", "scheduled"),
    ],
)
def test_resume_after_kill_between_store_rows_and_checkpoint_is_bitwise_exact(
    tmp_path: Path, optimizer_name: str, protocol: str
) -> None:
    """Also with a warmup + cosine schedule and a per-step EMA: the lr, the average and its
    counter continue where the checkpoint left them."""
    run_dir, db = tmp_path / "run", tmp_path / "r.db"
    config = SCHEDULED if protocol == "scheduled" else CONFIG
    evaluators = _protocol_evaluators if protocol == "scheduled" else _evaluators
    with ResultsStore(db) as store:
        _register(store, "run", optimizer_name)
    killed = subprocess.run(
        [sys.executable, __file__, str(run_dir), str(db), optimizer_name, protocol],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 1, killed.stderr
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["epoch"] == KILLED_AT_EPOCH - 1
    store = ResultsStore(db)
    assert store.curves("run")["epoch"] == [1.0, 2.0, 3.0]
    assert not store.is_complete("run")

    model, optimizer, data = _make_run(optimizer_name)
    resumed_evaluators = evaluators(data)
    resumed = train(
        model,
        optimizer,
        data,
        _mse,
        config,
        resumed_evaluators,
        run_dir,
        store,
        "run",
        progress=False,
    )
    ref_model, ref_optimizer, ref_data = _make_run(optimizer_name)
    reference_evaluators = evaluators(ref_data)
    reference = train(
        ref_model, ref_optimizer, ref_data, _mse, config, reference_evaluators, progress=False
    )

    _assert_bitwise_equal(model.state_dict(), ref_model.state_dict(), "model")
    for resumed_evaluator, reference_evaluator in zip(
        resumed_evaluators, reference_evaluators, strict=True
    ):
        if hasattr(reference_evaluator, "state_dict"):
            _assert_bitwise_equal(
                resumed_evaluator.state_dict(), reference_evaluator.state_dict(), "evaluator"
            )
    if protocol == "scheduled":
        assert optimizer.param_groups[0]["lr"] < 1e-2 * 0.1  # decayed near the end
    _assert_bitwise_equal(optimizer.state_dict(), ref_optimizer.state_dict(), "optimizer")
    without_time = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in reference]
    assert [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in resumed] == without_time
    assert store.curves("run")["train_loss"] == [h["train_loss"] for h in reference]
    assert store.is_complete("run")
    store.close()
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT epoch, COUNT(*), COUNT(DISTINCT name) FROM metrics"
            " GROUP BY epoch ORDER BY epoch"
        ).fetchall()
    metrics = 6 if protocol == "scheduled" else 5
    assert rows == [(epoch, metrics, metrics) for epoch in range(1, 5)]


def test_resume_under_another_schedule_or_budget_raises(tmp_path: Path) -> None:
    model, optimizer, data = _make_run("adamw")
    train(model, optimizer, data, _mse, replace(SCHEDULED, epochs=1), run_dir=tmp_path,
          progress=False)  # fmt: skip
    for changed, field in ((replace(SCHEDULED, epochs=2), "epochs"), (CONFIG, "schedule")):
        model, optimizer, data = _make_run("adamw")
        with pytest.raises(ValueError, match=field):
            train(model, optimizer, data, _mse, changed, run_dir=tmp_path, progress=False)


def test_the_schedule_sets_the_lr_of_every_optimizer_step() -> None:
    """The lr each step is taken at equals base × LrMultiplier(step), over epochs × ⌈n/b⌉."""
    model, optimizer, data = _make_run("dopr-muon")
    seen: list[float] = []

    class Probe:
        def on_step(self, model: nn.Module) -> None:
            seen.append(optimizer.param_groups[0]["lr"])

        def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
            return {}

    config = TrainConfig(epochs=3, batch_size=24, schedule="linear", warmup=0.25)
    train(model, optimizer, data, _mse, config, [Probe()], progress=False)
    total = 3 * 3  # 64 samples in batches of 24: 3 steps per epoch
    multiplier = LrMultiplier("linear", warmup_steps=2, total_steps=total)
    # The probe runs after the scheduler has stepped: it sees the rate of the *next* step.
    assert seen == pytest.approx([1e-2 * multiplier(s + 1) for s in range(total)])
    assert all(g["lr"] == pytest.approx(seen[-1]) for g in optimizer.param_groups)


if __name__ == "__main__":
    _killed_worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
