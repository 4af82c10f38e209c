"""PosthocTracker in a hand-written loop and in the training loop; save, load, rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.posthoc.tracker import EvalSplit, PosthocLog, PosthocTracker
from beyondloss.train import TrainConfig, train

N_CLASSES = 3


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def _setup(**kwargs: object) -> tuple[nn.Module, torch.optim.Optimizer, PosthocTracker]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (xv, yv), (xt, yt) = _data(40, 1), _data(50, 2)
    noisy = yv.roll(1)
    tracker = PosthocTracker(
        EvalSplit(xv, noisy, clean_labels=yv), EvalSplit(xt, yt), ema_decays=(0.5,), **kwargs
    )
    return model, optimizer, tracker


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    x, y = _data(64, 100 + epoch)
    model.train()
    for i in range(0, 64, 16):
        optimizer.zero_grad()
        F.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
        optimizer.step()


def test_tracker_in_a_plain_loop_logs_logits_and_averages(tmp_path: Path) -> None:
    model, optimizer, tracker = _setup(keep_states=True, swa_start=2)
    for epoch in range(1, 5):
        _train_epoch(model, optimizer, epoch)
        metrics = tracker.update(model, epoch)
        assert model.training
    assert tracker.kinds == ("base", "swa", "ema0.5")
    assert tracker.epochs == [1, 2, 3, 4]
    assert tracker.logits("swa", "test").shape == (4, 50, N_CLASSES)
    assert tracker.logits("base", "val").dtype == torch.float16
    assert {"base/val_nll", "swa/test_error", "ema0.5/val_clean_ece"} <= set(metrics)
    assert "base/test_clean_nll" not in metrics
    # Before swa_start the SWA model is the base model.
    torch.testing.assert_close(tracker.logits("swa", "val")[0], tracker.logits("base", "val")[0])

    base_states = [tracker.state("base", e) for e in (2, 3, 4)]
    for name, value in tracker.state("swa", 4).items():
        expected = torch.stack([s[name] for s in base_states]).mean(0)
        torch.testing.assert_close(value, expected)
    rebuilt = tracker.rebuild("swa", 3, template=model)
    x_test = tracker.splits["test"].inputs
    torch.testing.assert_close(
        rebuilt(x_test).half(), tracker.logits("swa", "test")[2], atol=1e-2, rtol=1e-3
    )

    path = tmp_path / "posthoc.pt"
    tracker.save(path)
    log = PosthocLog.load(path)
    assert log.epochs == tracker.epochs and log.kinds == tracker.kinds
    assert torch.equal(log.logits("ema0.5", "test"), tracker.logits("ema0.5", "test"))
    assert torch.equal(log.labels("val", clean=True), tracker.splits["val"].clean_labels)
    assert log.metrics("base", "val")["nll"][-1] == pytest.approx(metrics["base/val_nll"])
    # Every returned metric is the single-pair metric of the stored logits (the stacked pass
    # reuses one layout of kinds × splits × label sets from epoch to epoch).
    for index, epoch in enumerate(log.epochs):
        returned = log.metrics_at(index)
        assert len(returned) == 4 * (len(log.kinds) * 3)  # val noisy + val clean + test
        for kind in log.kinds:
            for split, clean in (("val", False), ("val", True), ("test", False)):
                curve = log.metrics(kind, split, clean=clean)
                name = f"{kind}/{split}{'_clean' if clean else ''}"
                for metric, values in curve.items():
                    assert returned[f"{name}_{metric}"] == pytest.approx(values[index], rel=1e-12)
        if epoch == 4:
            assert returned == pytest.approx(metrics, rel=1e-15)
    with pytest.raises(ValueError, match="already tracked"):
        tracker.update(model, 4)


def test_resumed_tracker_continues_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    model, optimizer, tracker = _setup()
    for epoch in (1, 2):
        _train_epoch(model, optimizer, epoch)
        tracker(model, epoch)
    tracker.save(tmp_path / "posthoc.pt")
    _, _, resumed = _setup()
    resumed.load(tmp_path / "posthoc.pt")
    _train_epoch(model, optimizer, 3)
    assert tracker(model, 3) == resumed(model, 3)
    for kind in tracker.kinds:
        assert torch.equal(resumed.logits(kind, "test"), tracker.logits(kind, "test"))


def test_tracker_is_an_evaluator_of_the_training_loop(tmp_path: Path) -> None:
    model, optimizer, tracker = _setup(state_dir=tmp_path / "states")
    x, y = _data(64, 7)
    history = train(
        model,
        optimizer,
        TensorDataset(x, y),
        lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        TrainConfig(epochs=3, batch_size=16, seed=0),
        evaluators=[tracker],
        progress=False,
    )
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0]
    assert history[-1]["swa/val_nll"] == tracker.log.metrics_at(-1)["swa/val_nll"]
    assert (tmp_path / "states" / "ema0.5_epoch0002.pt").exists()
    assert set(tracker.state("base", 2)) == set(model.state_dict())
