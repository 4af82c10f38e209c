"""Lorenz-63 task: integrator accuracy, deterministic disjoint splits, loss and rollout metrics;
the same task on Lorenz-96."""

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch import nn

from beyondloss.tasks import make_task
from beyondloss.tasks.base import Task
from beyondloss.tasks.dynamics import (
    LORENZ96_FORCING,
    LORENZ96_SITES,
    LYAPUNOV_EXPONENT,
    Lorenz63Task,
    Lorenz96Task,
    LorenzConfig,
    integrate,
    lorenz63_rhs,
    lorenz96_rhs,
    rk4_step,
)

TINY = LorenzConfig(n_train_trajectories=2, train_steps=200, n_rollouts=8, horizon_lt=3.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Rollouts are thousands of tiny forwards: with a second intra-op thread competing for a
    busy core, each one waits on the thread pool and a rollout takes seconds instead of ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task() -> Lorenz63Task:
    return Lorenz63Task(TINY)


class TrueFlowMap(nn.Module):
    """The data's RK4 map in standardized coordinates; NaN after ``valid_steps`` calls if given."""

    def __init__(self, task: Lorenz63Task, valid_steps: int | None = None) -> None:
        super().__init__()
        self.mean, self.std, self.config = task.state_mean, task.state_std, task.config
        self.valid_steps = valid_steps
        self.calls = 0

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        physical = state.double().numpy() * self.std.numpy() + self.mean.numpy()
        for _ in range(self.config.substeps):
            physical = rk4_step(physical, self.config.dt / self.config.substeps)
        nxt = torch.from_numpy((physical - self.mean.numpy()) / self.std.numpy()).to(state.dtype)
        if self.valid_steps is not None and self.calls > self.valid_steps:
            return torch.full_like(nxt, float("nan"))
        return nxt


class Elementwise(nn.Module):
    """A model applying ``fn`` to the state (with one parameter, so it has a device and dtype)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.fn(state)


def full_horizon_lt(config: LorenzConfig) -> float:
    return config.horizon_steps * config.dt * LYAPUNOV_EXPONENT


def test_rk4_matches_solve_ivp_over_one_time_unit() -> None:
    start = integrate(np.array([[1.0, 2.0, 20.0]]), 0.01, 1000)[:, -1]
    ours = integrate(start, 0.01, 100, substeps=4)[0]
    reference = solve_ivp(
        lambda _, s: lorenz63_rhs(s),
        (0.0, 1.0),
        start[0],
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
        t_eval=np.linspace(0.0, 1.0, 101),
    ).y.T
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_task_implements_the_protocol_and_names_every_metric(task: Lorenz63Task) -> None:
    assert isinstance(task, Task)
    metrics = task.evaluate(Elementwise(lambda x: x), "val")
    assert set(metrics) == set(task.higher_is_better)
    assert task.primary_metric in metrics and task.higher_is_better[task.primary_metric]


def test_splits_are_deterministic_by_seed(task: Lorenz63Task) -> None:
    again = Lorenz63Task(TINY).splits()
    other = Lorenz63Task(LorenzConfig(**{**TINY.__dict__, "seed": 1})).splits()
    for name in ("train", "val", "test"):
        ours, theirs = getattr(task.splits(), name).tensors, getattr(again, name).tensors
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert not torch.equal(ours[0], getattr(other, name).tensors[0])


def test_splits_share_no_state(task: Lorenz63Task) -> None:
    s = task.splits()
    states = {name: getattr(s, name).tensors[0] for name in ("train", "val", "test")}
    assert torch.cdist(states["train"], states["val"]).min() > 1e-3
    assert torch.cdist(states["train"], states["test"]).min() > 1e-3
    assert torch.cdist(states["val"], states["test"]).min() > 1e-3


def test_states_are_standardized_and_lie_on_the_bounded_attractor(task: Lorenz63Task) -> None:
    s = task.splits()
    train = s.train.tensors[0]
    torch.testing.assert_close(train.mean(0), torch.zeros(3), atol=0.02, rtol=0)
    torch.testing.assert_close(train.std(0), torch.ones(3), atol=0.02, rtol=0)
    for name in ("train", "val", "test"):
        physical = getattr(s, name).tensors[0].double() * task.state_std + task.state_mean
        x, y, z = physical.unbind(-1)
        assert x.abs().max() < 22 and y.abs().max() < 30 and 0 < z.min() and z.max() < 50
        assert physical.std(0).min() > 5  # spread over both wings, not stuck at a fixed point


def test_true_flow_map_has_zero_one_step_loss_and_persistence_has_unit_loss(
    task: Lorenz63Task,
) -> None:
    batch = task.splits().train.tensors
    assert task.loss(TrueFlowMap(task), batch) < 1e-6
    assert task.loss(Elementwise(lambda x: x), batch).item() == pytest.approx(1.0, abs=0.05)


def test_true_flow_map_is_valid_over_the_whole_horizon(task: Lorenz63Task) -> None:
    metrics = task.evaluate(TrueFlowMap(task), "test")
    assert metrics["vpt"] == pytest.approx(full_horizon_lt(task.config))
    assert metrics["vpt_median"] == pytest.approx(full_horizon_lt(task.config))
    assert max(metrics["nrmse@0.5lt"], metrics["nrmse@1lt"], metrics["nrmse@2lt"]) < 1e-3


def test_rollout_that_breaks_after_k_steps_is_valid_for_k_steps(task: Lorenz63Task) -> None:
    metrics = task.evaluate(TrueFlowMap(task, valid_steps=80), "val")
    assert metrics["vpt"] == pytest.approx(80 * task.config.dt * LYAPUNOV_EXPONENT)
    assert metrics["nrmse@0.5lt"] < 1e-3  # step 55
    assert metrics["nrmse@1lt"] == float("inf")  # step 110


@pytest.mark.parametrize(
    "fn",
    [torch.zeros_like, torch.randn_like, lambda x: 1e30 * x, lambda x: x * float("nan")],
    ids=["zeros", "noise", "overflow", "nan"],
)
def test_useless_or_diverging_model_gets_vpt_near_zero_without_crashing(
    task: Lorenz63Task, fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    torch.manual_seed(0)
    metrics = task.evaluate(Elementwise(fn), "test")
    # pure noise can land within the threshold of the truth by chance for a step or two
    assert metrics["vpt"] < 3 * task.config.dt * LYAPUNOV_EXPONENT
    assert metrics["vpt_median"] == 0.0
    assert metrics["nrmse@2lt"] > 0.5


def test_persistence_is_valid_only_briefly(task: Lorenz63Task) -> None:
    vpt = task.evaluate(Elementwise(lambda x: x), "val")["vpt"]
    assert 0.0 < vpt < 0.5


def test_model_trains_in_float32_and_evaluates_in_its_own_dtype(task: Lorenz63Task) -> None:
    torch.manual_seed(0)
    model = task.make_model()
    torch.manual_seed(0)
    twin = task.make_model()
    assert any(isinstance(m, nn.Linear) for m in model.modules())
    pairs = zip(model.parameters(), twin.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    x, y = task.splits().train.tensors
    loss = task.loss(model, (x[:64], y[:64]))
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None for p in model.parameters())
    model.train()
    metrics = task.evaluate(model.double(), "val")
    assert model.training and all(np.isfinite(v) for v in metrics.values())


def test_evaluate_rejects_the_train_split(task: Lorenz63Task) -> None:
    with pytest.raises(ValueError):
        task.evaluate(Elementwise(lambda x: x), "train")


@pytest.mark.parametrize("change", [{"horizon_lt": 1.0}, {"n_rollouts": 0}, {"dt": -0.01}])
def test_config_rejects_invalid_values(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LorenzConfig(**change)


def test_quick_config_has_at_least_100_rollouts_of_several_lyapunov_times() -> None:
    for config in (LorenzConfig.quick(), LorenzConfig.full()):
        assert config.n_rollouts >= 100 and config.horizon_lt >= 8


def test_lorenz96_field_is_cyclic_with_its_equilibrium_at_the_forcing() -> None:
    rng = np.random.default_rng(0)
    state = rng.normal(size=(4, LORENZ96_SITES))
    # x_i' = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, written out for one site of one state.
    x = state[0]
    i, n = 3, LORENZ96_SITES
    expected = (x[(i + 1) % n] - x[(i - 2) % n]) * x[(i - 1) % n] - x[i] + LORENZ96_FORCING
    assert lorenz96_rhs(state)[0, i] == pytest.approx(expected)
    np.testing.assert_allclose(
        lorenz96_rhs(np.roll(state, 1, axis=1)), np.roll(lorenz96_rhs(state), 1, axis=1)
    )
    np.testing.assert_allclose(lorenz96_rhs(np.full(n, LORENZ96_FORCING)), 0.0, atol=1e-12)


def test_lorenz96_task_forecasts_ten_sites_on_its_own_lyapunov_clock() -> None:
    config = replace(
        LorenzConfig.quick(system="lorenz96"),
        n_train_trajectories=2,
        train_steps=100,
        n_rollouts=4,
        horizon_lt=2.0,
    )
    task = Lorenz96Task(config)
    assert task.name == "lorenz96" and config.chaotic_system.dim == 10
    assert config.horizon_steps == round(2.0 / (1.20 * config.dt))
    state, target = task.splits().train.tensors
    assert state.shape == target.shape == (200, 10)
    torch.manual_seed(0)
    model = task.make_model()
    assert model(state[:3]).shape == (3, 10)
    metrics = task.evaluate(model, "test")
    assert 0 < metrics["vpt"] < 2.0
    assert make_task("lorenz96").name == "lorenz96"
    with pytest.raises(ValueError, match="system must be one of lorenz63, lorenz96"):
        LorenzConfig(system="rossler")
    with pytest.raises(ValueError, match="needs system 'lorenz96'"):
        Lorenz96Task(LorenzConfig.quick())
