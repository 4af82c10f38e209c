"""Flow-matching task: seeded data, disjoint splits, loss, integrators and deployed metrics."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from beyondloss.metrics.distribution import mmd, wasserstein2
from beyondloss.tasks.base import Task
from beyondloss.tasks.flow import (
    TOY_DATASETS,
    FlowConfig,
    FlowMatchingTask,
    flow_matching_loss,
    integrate,
    make_flow_task,
    sample_toy,
    split_digits,
)

TINY = {
    "n_train": 512,
    "n_heldout": 300,
    "n_eval": 300,
    "euler_steps": (1, 4),
    "midpoint_steps": (2,),
    "primary_steps": 4,
}


def tiny(dataset: str = "moons", seed: int = 0) -> FlowMatchingTask:
    return FlowMatchingTask(FlowConfig(dataset=dataset, seed=seed, **TINY))


class StraightPaths(nn.Module):
    """The perfect model for a task's deployment: the velocity of the straight lines from the
    task's fixed noise ``start[i]`` to ``end[i]``. At ``(x, t)`` it returns the velocity of the
    line that passes nearest to ``x`` at time ``t``; Euler and midpoint integrate it exactly."""

    def __init__(self, start: torch.Tensor, end: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("start", start.clone())
        self.register_buffer("end", end.clone())
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device and dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert bool((t == t[0]).all())
        positions = (1 - t[0]) * self.start + t[0] * self.end
        nearest = torch.cdist(x, positions).argmin(dim=1)
        return (self.end - self.start)[nearest]


class Still(nn.Module):
    """Zero velocity: the deployed samples are the starting noise itself."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_samplers_are_deterministic_by_seed(name: str) -> None:
    first = sample_toy(name, 300, seed=3)
    assert first.shape == (300, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, sample_toy(name, 300, seed=3))
    assert not np.array_equal(first, sample_toy(name, 300, seed=4))


def test_checkerboard_points_lie_on_the_dark_squares() -> None:
    points = sample_toy("checkerboard", 2000, seed=0)
    assert np.abs(points).max() <= 4.0
    column, row = np.floor(points[:, 0] / 2), np.floor(points[:, 1] / 2)
    assert ((column + row) % 2 == 0).all()


def test_eight_gaussians_fill_every_mode() -> None:
    points = sample_toy("8gaussians", 4000, seed=0)
    modes = np.round(np.arctan2(points[:, 1], points[:, 0]) / (2 * math.pi / 8)) % 8
    assert np.bincount(modes.astype(int), minlength=8).min() > 400


@pytest.mark.parametrize("dataset", ["moons", "digits"])
def test_task_data_are_deterministic_by_seed(dataset: str) -> None:
    a, b, other = tiny(dataset, 0), tiny(dataset, 0), tiny(dataset, 1)
    for split in ("train", "val", "test"):
        tensors = getattr(a.splits(), split).tensors
        for left, right in zip(tensors, getattr(b.splits(), split).tensors, strict=True):
            torch.testing.assert_close(left, right, rtol=0, atol=0)
        assert not torch.equal(tensors[0], getattr(other.splits(), split).tensors[0])
    torch.testing.assert_close(a.noise("test"), b.noise("test"), rtol=0, atol=0)


def test_toy_splits_are_standardized_and_disjoint() -> None:
    task = tiny("spirals")
    splits = task.splits()
    train = splits.train.tensors[0]
    torch.testing.assert_close(train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, correction=0), torch.ones(2), atol=1e-5, rtol=0)
    rows = [
        {tuple(row) for row in split.tensors[0].tolist()}
        for split in (splits.train, splits.val, splits.test)
    ]
    assert len(rows[0]) == 512 and len(rows[1]) == len(rows[2]) == 300
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_digits_split_is_a_seeded_partition_of_the_images() -> None:
    parts = split_digits(seed=0, n_heldout=300)
    assert [len(parts[split][0]) for split in ("train", "val", "test")] == [1197, 300, 300]
    images, labels = load_digits(return_X_y=True)
    union = np.concatenate([parts[split][0] for split in ("train", "val", "test")])
    union_labels = np.concatenate([parts[split][1] for split in ("train", "val", "test")])
    # The same rows, each once: sorting both row sets (with labels) gives equal arrays.
    ordered = np.lexsort(np.column_stack((union, union_labels)).T)
    reference = np.lexsort(np.column_stack((images, labels)).T)
    np.testing.assert_array_equal(union[ordered], images[reference])
    np.testing.assert_array_equal(split_digits(0, 300)["val"][0], parts["val"][0])
    assert not np.array_equal(split_digits(1, 300)["val"][0], parts["val"][0])


def test_digits_rows_are_dequantized_standardized_tiles_of_the_training_images() -> None:
    task = FlowMatchingTask(FlowConfig(dataset="digits", **{**TINY, "n_train": 2 * 1197}))
    train = task.splits().train.tensors[0].double()
    images = split_digits(0, 300)["train"][0]
    scale = math.sqrt(images.var(axis=0).mean() + 1 / 12)
    # Rows i and i + 1197 are the same image, each with its own noise u ~ U(−½, ½) per pixel.
    levels = (train[1197:] - train[:1197]) * scale
    assert bool((levels.abs() < 1.0).all()) and float(levels.abs().mean()) > 0.2
    assert abs(float(train.mean())) < 0.01 and float(train.square().mean()) == pytest.approx(
        1.0, abs=0.01
    )


def test_flow_matching_loss_is_zero_for_the_true_velocity_of_a_translation() -> None:
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, -2.0, 0.5])
    t = torch.rand(64, generator=torch.Generator().manual_seed(1))

    def constant(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return shift.expand_as(x)

    assert flow_matching_loss(constant, x0 + shift, x0, t).item() == pytest.approx(0.0, abs=1e-12)
    zero = flow_matching_loss(lambda x, time: torch.zeros_like(x), x0 + shift, x0, t)
    assert zero.item() == pytest.approx(float(shift.square().mean()))


def test_val_loss_is_deterministic_and_train_loss_draws_fresh_noise() -> None:
    task = tiny()
    torch.manual_seed(0)
    model = task.make_model()
    val = task.splits().val.tensors
    assert task.loss(model, list(val)).item() == task.loss(model, list(val)).item()
    train_batch = [task.splits().train.tensors[0][:64]]
    assert task.loss(model, train_batch).item() != task.loss(model, train_batch).item()


def test_integrators_are_exact_for_constant_and_match_their_formulas_for_linear_fields() -> None:
    x0 = torch.randn(5, 2, dtype=torch.float64)
    for solver in ("euler", "midpoint"):
        moved = integrate(lambda x, t: torch.ones_like(x), x0, 3, solver)
        torch.testing.assert_close(moved, x0 + 1.0)
    # dx/dt = a x: Euler multiplies by (1 + a h) per step, midpoint by 1 + a h + (a h)² / 2.
    a, k = -1.5, 4
    h = 1.0 / k
    euler = integrate(lambda x, t: a * x, x0, k, "euler")
    midpoint = integrate(lambda x, t: a * x, x0, k, "midpoint")
    torch.testing.assert_close(euler, x0 * (1 + a * h) ** k)
    torch.testing.assert_close(midpoint, x0 * (1 + a * h + (a * h) ** 2 / 2) ** k)
    # dx/dt = t: x(1) = x0 + 1/2; Euler samples t = 0, h, ..., 1 − h and falls short by h/2.
    euler = integrate(lambda x, t: t[:, None].expand_as(x), x0, k, "euler")
    midpoint = integrate(lambda x, t: t[:, None].expand_as(x), x0, k, "midpoint")
    torch.testing.assert_close(euler, x0 + 0.5 - h / 2)
    torch.testing.assert_close(midpoint, x0 + 0.5)


def test_velocity_mlp_maps_points_and_times_to_velocities() -> None:
    task = tiny("digits")
    model = task.make_model()
    out = model(torch.randn(7, 64), torch.rand(7))
    assert out.shape == (7, 64)
    assert all(isinstance(m, nn.Linear) for m in model.net if any(True for _ in m.parameters()))


@pytest.mark.parametrize("dataset", ["checkerboard", "digits"])
def test_perfect_model_gets_perfect_scores_and_a_still_model_gets_the_noise_floor(
    dataset: str,
) -> None:
    task = tiny(dataset)
    start, reference = task.noise("test"), task.references("test")
    perfect = task.evaluate(StraightPaths(start, reference), "test")
    still = task.evaluate(Still(), "test")
    floor_w2 = wasserstein2(start, reference)
    floor_mmd = mmd(start, reference, task.mmd_bandwidths)
    # The unbiased MMD² of a sample with itself is its perfect score, O(1/n) below zero.
    perfect_mmd = mmd(reference, reference, task.mmd_bandwidths)
    assert perfect_mmd <= 0.0 < floor_mmd
    for label in ("euler1", "euler4", "midpoint2"):
        assert perfect[f"w2@{label}"] < 1e-3 * floor_w2
        assert perfect[f"mmd@{label}"] == pytest.approx(perfect_mmd, abs=1e-6)
        assert still[f"w2@{label}"] == pytest.approx(floor_w2)
        assert still[f"mmd@{label}"] == pytest.approx(floor_mmd)
        if dataset == "digits":
            # Real held-out digits: most are confident, every class is covered; noise: neither.
            assert perfect[f"confident@{label}"] > 0.7
            assert perfect[f"coverage@{label}"] == 1.0
            assert still[f"confident@{label}"] < 0.05
            assert still[f"coverage@{label}"] == 0.0
    assert set(perfect) == set(task.higher_is_better)
    assert task.primary_metric == "w2@euler4" and not task.higher_is_better["w2@euler4"]


@pytest.mark.parametrize("dataset", [*TOY_DATASETS, "digits"])
def test_held_out_data_are_close_to_each_other_relative_to_noise(dataset: str) -> None:
    """MMD² on all held-out points (1000 for 2-D, 300 for digits), W2 on the 500 (300)
    references. W2 keeps a finite-sample floor (≈ n^(-1/d)): 0.3–0.6 of the noise's."""
    heldout = 300 if dataset == "digits" else 1000
    config = FlowConfig(dataset=dataset, n_train=2048, n_heldout=heldout, n_eval=min(heldout, 500))
    task = FlowMatchingTask(config)
    splits, bandwidths = task.splits(), task.mmd_bandwidths
    val, test = splits.val.tensors[0], splits.test.tensors[0]
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    mmd_share = 0.2 if dataset == "digits" else 0.1
    assert abs(mmd(val, test, bandwidths)) < mmd_share * mmd(noise, test, bandwidths)
    references = task.references("test")
    assert wasserstein2(task.references("val"), references) < 0.7 * wasserstein2(
        task.noise("test"), references
    )


def test_evaluate_leaves_the_global_rng_and_the_training_mode_alone() -> None:
    task = tiny()
    torch.manual_seed(0)
    model = task.make_model().train()
    state = torch.get_rng_state()
    first = task.evaluate(model, "val")
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert first == task.evaluate(model, "val")
    assert first != task.evaluate(model, "test")
    with pytest.raises(ValueError, match="split"):
        task.evaluate(model, "train")


def test_diverged_model_scores_infinite_distances_and_no_digits() -> None:
    class Exploding(Still):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, float("nan"))

    metrics = tiny("digits").evaluate(Exploding(), "val")
    assert metrics["w2@euler4"] == math.inf and metrics["mmd@euler4"] == math.inf
    assert metrics["confident@euler4"] == 0.0 and metrics["coverage@euler4"] == 0.0


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        FlowConfig(dataset="mnist")
    with pytest.raises(ValueError, match="n_eval"):
        FlowConfig(n_heldout=100, n_eval=200)
    with pytest.raises(ValueError, match="n_heldout must be at most 398"):
        FlowConfig(dataset="digits", n_heldout=500)
    with pytest.raises(ValueError, match="primary_steps"):
        FlowConfig(euler_steps=(1, 2), primary_steps=8)
    with pytest.raises(ValueError, match="euler_steps"):
        FlowConfig(euler_steps=(0, 8))


def test_factory_sizes_and_task_protocol() -> None:
    quick, full = make_flow_task("quick", 0, "digits"), make_flow_task("full", 0, "8gaussians")
    assert isinstance(quick, Task) and quick.name == "flow-digits"
    assert quick.config.n_eval == 300 and full.config.n_eval == 2000
    assert full.config.euler_steps == full.config.midpoint_steps == (1, 2, 4, 8, 16, 32)
    assert quick.primary_metric == full.primary_metric == "w2@euler8"
    assert quick.epochs == 10 and quick.batch_size == 256
    with pytest.raises(ValueError, match="size"):
        make_flow_task("huge", 0)


def test_primary_only_evaluates_just_the_primary_configuration() -> None:
    task = tiny()
    torch.manual_seed(0)
    model = task.make_model()
    every = task.evaluate(model, "val")
    primary = task.evaluate(model, "val", primary_only=True)
    assert set(primary) == {task.primary_metric, "mmd@euler4"}
    assert primary == {name: every[name] for name in primary}
