"""Learned dynamics of a chaotic system: train on one-step pairs, deploy as an autoregressive model.

:class:`Lorenz63Task` — the Lorenz-63 system

.. math::

    \\dot x = \\sigma (y - x), \\qquad \\dot y = x(\\rho - z) - y, \\qquad \\dot z = xy - \\beta z,

with :math:`\\sigma = 10, \\rho = 28, \\beta = 8/3` (largest Lyapunov exponent
:math:`\\lambda_{\\max} \\approx 0.906`, so one Lyapunov time is about 1.10 time units).

Data. Initial conditions are drawn uniformly from a box around the attractor, integrated for a
transient so that they lie on it, then integrated further with classical RK4 in float64 at step
``dt / substeps`` and sampled every ``dt`` time units. Training, validation and test
trajectories start from initial conditions drawn from three independent random streams spawned
from the task seed. States are standardized with the per-dimension mean and standard deviation
of the training states.

Model and loss. An MLP ``f`` maps the standardized state to the standardized one-step increment
in units of its training standard deviation ``s`` (per dimension), so the model's next state is
:math:`\\hat x_{t+1} = x_t + s \\odot f(x_t)`. The one-step loss is the mean squared error of
that next state measured in the same units,

.. math::

    L = \\frac{1}{Bd}\\sum_{b,j} \\Big(\\frac{\\hat x_{t+1,bj} - x_{t+1,bj}}{s_j}\\Big)^2 ,

so the persistence forecast :math:`\\hat x_{t+1} = x_t` scores about 1.

:class:`Lorenz96Task` — the same task on the Lorenz-96 system of ``N = 10`` sites,

.. math::

    \\dot x_i = (x_{i+1} - x_{i-2})\\, x_{i-1} - x_i + F, \\qquad F = 8

(indices cyclic; largest Lyapunov exponent :math:`\\approx 1.20`, measured by
``experiments/lyapunov_lorenz96.py``), a chaotic family of another dimension and coupling for
checks held out from Lorenz-63. Each system is a :class:`ChaoticSystem`; everything below
applies to both, with the system's dimension, exponent and initial box.

Deployment. :meth:`Lorenz63Task.evaluate` rolls the model out autoregressively from the first
state of every held-out trajectory of the split (all trajectories advance together, one forward
per step) and compares with the reference: valid prediction time and normalized RMSE (see
:mod:`beyondloss.metrics.rollout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from beyondloss.metrics.rollout import normalized_rmse, valid_prediction_times
from beyondloss.tasks.base import ConfiguredTask, Splits, require_positive

SIGMA = 10.0
RHO = 28.0
BETA = 8.0 / 3.0
LYAPUNOV_EXPONENT = 0.906
"""Largest Lyapunov exponent of Lorenz-63 at (σ, ρ, β) = (10, 28, 8/3), per time unit."""

STATE_DIM = 3
NRMSE_REPORT_TIMES = MappingProxyType({"nrmse@0.5lt": 0.5, "nrmse@1lt": 1.0, "nrmse@2lt": 2.0})
"""Metric name → forecast time (Lyapunov times) at which the mean NRMSE is reported."""

_STOP_CHECK_LT = 0.5
"""Lyapunov times between early-stopping checks of a rollout (see ``_rollout_nrmse``)."""

# Initial conditions are uniform in this box (physical units), which encloses the attractor.
_INITIAL_BOX_LOW = np.array([-20.0, -25.0, 5.0])
_INITIAL_BOX_HIGH = np.array([20.0, 25.0, 45.0])


def lorenz63_rhs(state: np.ndarray) -> np.ndarray:
    """Time derivative of Lorenz-63 states; ``state`` has shape ``(..., 3)`` (x, y, z)."""
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack((SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z), axis=-1)


LORENZ96_FORCING = 8.0
LORENZ96_SITES = 10


def lorenz96_rhs(state: np.ndarray) -> np.ndarray:
    """Time derivative of Lorenz-96 states; ``state`` has shape ``(..., N)``, sites cyclic."""
    return (
        (np.roll(state, -1, axis=-1) - np.roll(state, 2, axis=-1)) * np.roll(state, 1, axis=-1)
        - state
        + LORENZ96_FORCING
    )


Rhs = Callable[[np.ndarray], np.ndarray]
"""``state (..., d) -> time derivative (..., d)`` of an autonomous system."""


@dataclass(frozen=True)
class ChaoticSystem:
    """An autonomous chaotic system the forecasting task can learn.

    ``rhs`` is its vector field on states ``(..., dim)``; ``lyapunov_exponent`` its largest
    Lyapunov exponent per time unit (the clock of valid prediction times); initial conditions
    are uniform in the box ``initial_low .. initial_high`` (physical units, ``(dim,)``) and then
    integrated for the config's transient onto the attractor.
    """

    name: str
    dim: int
    rhs: Rhs
    lyapunov_exponent: float
    initial_low: tuple[float, ...]
    initial_high: tuple[float, ...]


SYSTEMS = MappingProxyType(
    {
        "lorenz63": ChaoticSystem(
            "lorenz63",
            STATE_DIM,
            lorenz63_rhs,
            LYAPUNOV_EXPONENT,
            tuple(float(v) for v in _INITIAL_BOX_LOW),
            tuple(float(v) for v in _INITIAL_BOX_HIGH),
        ),
        "lorenz96": ChaoticSystem(
            "lorenz96",
            LORENZ96_SITES,
            lorenz96_rhs,
            1.20,
            (LORENZ96_FORCING - 1.0,) * LORENZ96_SITES,
            (LORENZ96_FORCING + 1.0,) * LORENZ96_SITES,
        ),
    }
)
"""The systems of :class:`LorenzConfig` by name."""


def rk4_step(state: np.ndarray, h: float, rhs: Rhs = lorenz63_rhs) -> np.ndarray:
    """One classical Runge–Kutta step of size ``h`` (time units) of ``rhs`` (Lorenz-63 by
    default); ``state`` has shape ``(..., d)``.

    .. math::

        k_1 = f(x),\\ k_2 = f(x + \\tfrac h2 k_1),\\ k_3 = f(x + \\tfrac h2 k_2),\\
        k_4 = f(x + h k_3),\\qquad x' = x + \\tfrac h6 (k_1 + 2k_2 + 2k_3 + k_4).
    """
    k1 = rhs(state)
    k2 = rhs(state + 0.5 * h * k1)
    k3 = rhs(state + 0.5 * h * k2)
    k4 = rhs(state + h * k3)
    return state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def integrate(
    initial: np.ndarray, dt: float, n_steps: int, substeps: int = 1, rhs: Rhs = lorenz63_rhs
) -> np.ndarray:
    """Trajectories of ``rhs`` (Lorenz-63 by default) sampled every ``dt`` time units, RK4 at
    step ``dt / substeps``.

    Parameters
    ----------
    initial:
        Initial states, shape ``(n, d)``; integrated in float64.
    dt:
        Sampling interval (time units).
    n_steps:
        Number of samples after the initial state.
    substeps:
        RK4 steps per sampling interval.

    Returns
    -------
    np.ndarray
        Shape ``(n, n_steps + 1, d)``, float64; ``[:, 0]`` is ``initial``.
    """
    if dt <= 0 or n_steps < 0 or substeps < 1:
        raise ValueError(
            f"need dt > 0, n_steps >= 0, substeps >= 1; got {dt}, {n_steps}, {substeps}"
        )
    h = dt / substeps
    state = np.asarray(initial, dtype=np.float64)
    samples = np.empty((n_steps + 1, *state.shape))
    samples[0] = state
    for step in range(1, n_steps + 1):
        for _ in range(substeps):
            state = rk4_step(state, h, rhs)
        samples[step] = state
    return samples.swapaxes(0, 1)


@dataclass(frozen=True)
class LorenzConfig:
    """Size and numerics of :class:`Lorenz63Task`. Times are in the system's time units.

    Attributes
    ----------
    seed:
        Seeds every initial condition; train, val and test use independent streams from it.
    system:
        The :class:`ChaoticSystem` learned, a key of :data:`SYSTEMS`.
    dt:
        Sampling interval of the data and step of the learned model (0.01 ≈ 1/110 Lyapunov time).
    substeps:
        RK4 steps per ``dt`` for the data (step ``dt / substeps``).
    transient:
        Integration time discarded so that the random initial conditions reach the attractor.
    n_train_trajectories, train_steps:
        Training data: that many trajectories of ``train_steps`` steps each, giving
        ``n_train_trajectories * train_steps`` one-step pairs.
    n_rollouts:
        Held-out trajectories per evaluation split (val, test).
    eval_pair_stride:
        The val and test one-step pairs are those starting every ``eval_pair_stride`` steps
        along the split's rollout reference trajectories (keeps per-epoch validation cheap).
    horizon_lt:
        Rollout length in Lyapunov times (at least the last NRMSE report time, 2).
    hidden, depth:
        Width and number of hidden layers of the MLP.
    vpt_threshold:
        NRMSE above which a forecast stops being valid.
    epochs, batch_size:
        Training budget: passes over the training pairs, and pairs per optimizer step.
    """

    seed: int = 0
    system: str = "lorenz63"
    dt: float = 0.01
    substeps: int = 4
    transient: float = 25.0
    n_train_trajectories: int = 16
    train_steps: int = 1000
    n_rollouts: int = 100
    eval_pair_stride: int = 10
    horizon_lt: float = 8.0
    hidden: int = 128
    depth: int = 2
    vpt_threshold: float = 0.4
    epochs: int = 20
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {self.system!r}")
        require_positive(
            self,
            (
                "substeps",
                "n_train_trajectories",
                "train_steps",
                "n_rollouts",
                "eval_pair_stride",
                "hidden",
                "depth",
                "epochs",
                "batch_size",
            ),
        )
        for name in ("dt", "vpt_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.transient < 0:
            raise ValueError(f"transient must be non-negative, got {self.transient}")
        last_report = max(NRMSE_REPORT_TIMES.values())
        if self.horizon_lt < last_report:
            raise ValueError(f"horizon_lt must be at least {last_report}, got {self.horizon_lt}")

    @property
    def chaotic_system(self) -> ChaoticSystem:
        """The system of :attr:`system`."""
        return SYSTEMS[self.system]

    @property
    def horizon_steps(self) -> int:
        """Rollout length in model steps: ``round(horizon_lt / (λ_max · dt))``."""
        return round(self.horizon_lt / (self.chaotic_system.lyapunov_exponent * self.dt))

    @classmethod
    def quick(cls, seed: int = 0, system: str = "lorenz63") -> LorenzConfig:
        """The defaults, study-sized: 16k training pairs, 20 epochs of batches of 256; 100 rollouts
        of 8 Lyapunov times per eval split."""
        return cls(seed=seed, system=system)

    @classmethod
    def full(cls, seed: int = 0, system: str = "lorenz63") -> LorenzConfig:
        """Larger: 80k training pairs, 40 epochs of batches of 256; 200 rollouts of 10 Lyapunov
        times per eval split."""
        return cls(
            seed=seed,
            system=system,
            n_train_trajectories=32,
            train_steps=2500,
            n_rollouts=200,
            horizon_lt=10.0,
            epochs=40,
        )


class IncrementMLP(nn.Module):
    """One-step model :math:`x \\mapsto x + s \\odot \\mathrm{MLP}(x)` on standardized states.

    Input and output have shape ``(batch, d)``; ``increment_scale`` ``s`` (shape ``(d,)``) is the
    training standard deviation of the standardized increments, so the MLP's targets are O(1).
    """

    def __init__(self, dim: int, hidden: int, depth: int, increment_scale: torch.Tensor) -> None:
        super().__init__()
        widths = [dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.GELU()]
        layers.append(nn.Linear(widths[-1], dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("increment_scale", increment_scale.detach().clone())

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Next standardized state, shape ``(batch, d)``."""
        return state + self.increment_scale * self.net(state)


@dataclass(frozen=True)
class _LorenzData:
    splits: Splits
    rollouts: dict[str, torch.Tensor]  # split → standardized reference, (n, horizon + 1, d)
    state_mean: torch.Tensor  # (d,), physical units
    state_std: torch.Tensor  # (d,), physical units
    increment_std: torch.Tensor  # (d,), standardized units


def _simulate(config: LorenzConfig) -> dict[str, np.ndarray]:
    """Physical-unit trajectories per split: train ``(n_train, train_steps + 1, d)``,
    val/test ``(n_rollouts, horizon_steps + 1, d)``.

    All splits are integrated in one batch (the cost is per step, not per trajectory); each
    trajectory's values depend only on its own initial condition.
    """
    counts = {
        "train": config.n_train_trajectories,
        "val": config.n_rollouts,
        "test": config.n_rollouts,
    }
    lengths = {
        "train": config.train_steps,
        "val": config.horizon_steps,
        "test": config.horizon_steps,
    }
    system = config.chaotic_system
    low, high = np.array(system.initial_low), np.array(system.initial_high)
    streams = np.random.SeedSequence(config.seed).spawn(len(counts))
    initial = np.concatenate(
        [
            np.random.default_rng(stream).uniform(low, high, (n, system.dim))
            for stream, n in zip(streams, counts.values(), strict=True)
        ]
    )
    transient_steps = round(config.transient / config.dt)
    on_attractor = integrate(initial, config.dt, transient_steps, rhs=system.rhs)[:, -1]
    trajectories = integrate(
        on_attractor, config.dt, max(lengths.values()), config.substeps, system.rhs
    )
    out: dict[str, np.ndarray] = {}
    start = 0
    for split, n in counts.items():
        out[split] = trajectories[start : start + n, : lengths[split] + 1]
        start += n
    return out


def _pairs(trajectories: torch.Tensor, stride: int = 1) -> TensorDataset:
    """One-step pairs ``(x_t, x_{t+1})``, ``t = 0, stride, 2·stride, … < T``, of trajectories
    ``(n, T + 1, d)``: ``n · ceil(T / stride)`` rows of shape ``(d,)`` each."""
    dim = trajectories.shape[-1]
    return TensorDataset(
        trajectories[:, :-1:stride].reshape(-1, dim).clone(),
        trajectories[:, 1::stride].reshape(-1, dim).clone(),
    )


def _build(config: LorenzConfig) -> _LorenzData:
    physical = _simulate(config)
    dim = config.chaotic_system.dim
    train_states = physical["train"].reshape(-1, dim)
    mean, std = train_states.mean(axis=0), train_states.std(axis=0)
    standardized = {
        split: torch.from_numpy((traj - mean) / std).to(torch.float32)
        for split, traj in physical.items()
    }
    train_increments = np.diff((physical["train"] - mean) / std, axis=1).reshape(-1, dim)
    return _LorenzData(
        splits=Splits(
            train=_pairs(standardized["train"]),
            val=_pairs(standardized["val"], config.eval_pair_stride),
            test=_pairs(standardized["test"], config.eval_pair_stride),
        ),
        rollouts={split: standardized[split] for split in ("val", "test")},
        state_mean=torch.from_numpy(mean),
        state_std=torch.from_numpy(std),
        increment_std=torch.from_numpy(train_increments.std(axis=0)).to(torch.float32),
    )


class Lorenz63Task(ConfiguredTask):
    """Lorenz-63 forecasting: one-step training, autoregressive deployment (see module docs).

    Data are generated on first use and kept. Metrics of :meth:`evaluate`:

    - ``vpt``: valid prediction time (Lyapunov times), mean over rollouts — primary;
    - ``vpt_median``: its median over rollouts (the lower middle value for an even count);
    - ``nrmse@0.5lt``, ``nrmse@1lt``, ``nrmse@2lt``: mean over rollouts of the NRMSE at that
      forecast time (``inf`` when any rollout is non-finite by then).
    """

    build_data = staticmethod(_build)

    name = "lorenz63"
    primary_metric = "vpt"
    higher_is_better = MappingProxyType(
        {"vpt": True, "vpt_median": True} | {metric: False for metric in NRMSE_REPORT_TIMES}
    )

    def __init__(self, config: LorenzConfig | None = None) -> None:
        self.config = LorenzConfig.quick() if config is None else config

    @property
    def state_mean(self) -> torch.Tensor:
        """Training mean of the states, shape ``(d,)``, physical units (float64)."""
        return self._data().state_mean

    @property
    def state_std(self) -> torch.Tensor:
        """Training standard deviation of the states, shape ``(d,)``, physical units (float64).

        It estimates the attractor's per-dimension spread; standardized states are
        ``(x - state_mean) / state_std``.
        """
        return self._data().state_std

    def splits(self) -> Splits:
        """Standardized one-step pairs ``(x_t, x_{t+1})`` (each ``(N, d)`` float32) per split.

        Train has ``n_train_trajectories · train_steps`` pairs; val and test are the pairs of
        their rollout reference trajectories every ``eval_pair_stride`` steps,
        ``n_rollouts · ceil(horizon_steps / eval_pair_stride)`` each.
        """
        return self._data().splits

    def make_model(self) -> nn.Module:
        """A fresh :class:`IncrementMLP` (d → hidden × depth → d, GELU); global torch RNG."""
        return IncrementMLP(
            self.config.chaotic_system.dim,
            self.config.hidden,
            self.config.depth,
            self._data().increment_std,
        )

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        """One-step MSE in increment-std units (module docs); ``batch = (x_t, x_{t+1})``, each
        ``(B, d)``; returns a scalar."""
        state, target = batch
        prediction = model(state)
        scale = self._data().increment_std.to(device=prediction.device, dtype=prediction.dtype)
        return ((prediction - target) / scale).square().mean()

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """Rollout metrics of ``model`` on ``split`` ("val" or "test"); see the class docs. Every
        metric comes from the same rollouts, so ``primary_only`` changes nothing.

        The model runs in eval mode under ``torch.no_grad`` on the device and dtype of its first
        parameter; its training mode is restored afterwards.
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float32
        reference = self._data().rollouts[split].to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                nrmse = self._rollout_nrmse(model, reference)
        finally:
            model.train(was_training)
        vpt = valid_prediction_times(
            nrmse, self.config.dt, self.config.vpt_threshold, self._lyapunov_exponent
        )
        metrics = {"vpt": float(vpt.mean()), "vpt_median": float(vpt.median())}
        for metric, time_lt in NRMSE_REPORT_TIMES.items():
            at_time = nrmse[:, self._step_index(time_lt)]
            metrics[metric] = float(torch.where(at_time.isfinite(), at_time, torch.inf).mean())
        return metrics

    def _step_index(self, time_lt: float) -> int:
        """Column of the NRMSE curve at forecast time ``time_lt`` Lyapunov times."""
        return round(time_lt / (self._lyapunov_exponent * self.config.dt)) - 1

    @property
    def _lyapunov_exponent(self) -> float:
        return self.config.chaotic_system.lyapunov_exponent

    def _rollout_nrmse(self, model: nn.Module, reference: torch.Tensor) -> torch.Tensor:
        """NRMSE curves ``(n, K)`` of rollouts from the first states of ``reference`` (n, H+1, d).

        Standardized states have unit training std, so NRMSE uses σ = 1. Errors are computed
        per chunk of steps: the first chunk covers every NRMSE report time, later ones
        :data:`_STOP_CHECK_LT` Lyapunov times each. The rollout stops early (K < H) after the
        chunk in which the last trajectory leaves the valid region: no valid prediction time
        changes after that.
        """
        horizon = reference.shape[1] - 1
        scale = torch.ones(reference.shape[-1], device=reference.device, dtype=reference.dtype)
        first_end = 1 + max(self._step_index(t) for t in NRMSE_REPORT_TIMES.values())
        check_every = max(1, round(_STOP_CHECK_LT / (self._lyapunov_exponent * self.config.dt)))
        chunk_ends = [*range(first_end, horizon, check_every), horizon]
        state = reference[:, 0]
        still_valid = torch.ones(reference.shape[0], dtype=torch.bool, device=reference.device)
        curves = []
        done = 0
        for end in chunk_ends:
            states = []
            for _ in range(done, end):
                state = model(state)
                states.append(state)
            chunk = normalized_rmse(
                torch.stack(states, dim=1), reference[:, done + 1 : end + 1], scale
            )
            curves.append(chunk)
            still_valid &= (chunk <= self.config.vpt_threshold).all(dim=1)
            done = end
            if not bool(still_valid.any()):
                break
        return torch.cat(curves, dim=1)


class Lorenz96Task(Lorenz63Task):
    """:class:`Lorenz63Task` on Lorenz-96 (``config.system == "lorenz96"``; module docs)."""

    name = "lorenz96"

    def __init__(self, config: LorenzConfig | None = None) -> None:
        config = LorenzConfig.quick(system="lorenz96") if config is None else config
        if config.system != "lorenz96":
            raise ValueError(f"Lorenz96Task needs system 'lorenz96', got {config.system!r}")
        super().__init__(config)
