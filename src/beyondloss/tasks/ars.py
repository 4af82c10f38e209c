"""Augmented Random Search (ARS V2-t): linear locomotion policies without gradients.

Mania, Guy & Recht (2018), "Simple random search provides a competitive approach to
reinforcement learning". The policy is linear in the standardized observation,

.. math::

    \\pi_M(o) = \\mathrm{clip}\\big(M\\,(o - \\mu) / \\sigma,\\; -1,\\; 1\\big),
    \\qquad M \\in \\mathbb R^{d_{act} \\times d_{obs}},

with :math:`\\mu, \\sigma` the running mean and standard deviation of every observation seen
in training (V2). With ``action_noise`` :math:`\\sigma_a > 0` every executed action, in training
and evaluation, is :math:`\\mathrm{clip}(\\pi(o) + \\sigma_a\\varepsilon, -1, 1)` with
:math:`\\varepsilon \\sim \\mathcal N(0, I)`: the policy is optimized for deployment under
actuator noise. One iteration, with :math:`N` directions, the top :math:`b` of them used,
exploration scale :math:`\\nu` and step size :math:`\\alpha`:

1. draw :math:`\\delta_1, \\dots, \\delta_N \\sim \\mathcal N(0, I)` of :math:`M`'s shape;
2. roll out :math:`\\pi_{M \\pm \\nu\\delta_k}` for one episode each, :math:`r_{k,\\pm}` the
   return with :math:`s` subtracted per step (``reward_shift``: the alive bonus of Hopper,
   so that standing still is not a local optimum); both signs of a direction start from the
   same initial state and the same actuator noise (common random numbers);
3. keep the :math:`b` directions with the largest :math:`\\max(r_{k,+}, r_{k,-})` (V-t);
4. :math:`M \\leftarrow M + \\frac{\\alpha}{b\\,\\sigma_R} \\sum_{k \\in \\text{top}}
   (r_{k,+} - r_{k,-})\\,\\delta_k`, :math:`\\sigma_R` the standard deviation of the
   :math:`2b` returns used;
5. merge the iteration's observations into :math:`\\mu, \\sigma` (they are frozen within an
   iteration, so every rollout of it sees the same normalization).

Every ``eval_every`` iterations the current policy is scored by its mean unshifted return over
``eval_episodes`` fresh episodes; training stops once that mean reaches ``target_return`` or
the environment-step budget is spent, and returns the best-scoring policy it evaluated. Every
random draw comes from one generator seeded by ``seed``, so a run is a deterministic function
of its config (on one platform and MuJoCo build).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import gymnasium as gym
import numpy as np

from beyondloss.tasks.base import require_positive

STD_FLOOR = 1e-6
"""Smallest observation standard deviation used to standardize (guards constant features)."""


@dataclass(frozen=True)
class ARSConfig:
    """Hyperparameters of one ARS run (symbols as in the module docs).

    Attributes
    ----------
    n_directions, top_directions:
        :math:`N` and :math:`b \\le N`.
    step_size, exploration_std:
        :math:`\\alpha` and :math:`\\nu`.
    reward_shift:
        :math:`s`, subtracted from every training reward (not from evaluation returns).
    action_noise:
        :math:`\\sigma_a`, standard deviation of the actuator noise (control-range units).
    horizon:
        Steps per episode, training and evaluation.
    max_steps:
        Budget of training environment steps (evaluation steps not counted).
    target_return:
        Stop once an evaluation's mean return reaches it.
    eval_every, eval_episodes:
        Iterations between evaluations, and episodes per evaluation.
    seed:
        Seeds the direction draws and every episode's initial state.
    """

    n_directions: int = 8
    top_directions: int = 4
    step_size: float = 0.01
    exploration_std: float = 0.025
    reward_shift: float = 0.0
    action_noise: float = 0.0
    horizon: int = 1000
    max_steps: int = 5_000_000
    target_return: float = float("inf")
    eval_every: int = 10
    eval_episodes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive(
            self, ("n_directions", "horizon", "max_steps", "eval_every", "eval_episodes")
        )
        if not 1 <= self.top_directions <= self.n_directions:
            raise ValueError(
                f"top_directions must be in [1, n_directions={self.n_directions}], "
                f"got {self.top_directions}"
            )
        for name in ("step_size", "exploration_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.action_noise >= 0:
            raise ValueError(f"action_noise must be non-negative, got {self.action_noise}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


class RunningMoments:
    """Mean and (population) variance of a stream of vectors, merged batch by batch (Chan et
    al.'s parallel update), in float64."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim)
        self.sum_squares = np.zeros(dim)

    def update(self, rows: np.ndarray) -> None:
        """Merge ``rows`` ``(n, dim)`` into the moments."""
        n = rows.shape[0]
        if n == 0:
            return
        batch_mean = rows.mean(axis=0)
        batch_squares = ((rows - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.sum_squares += batch_squares + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """Standard deviation, floored at :data:`STD_FLOOR`; ones before any data."""
        if self.count == 0:
            return np.ones_like(self.mean)
        return np.maximum(np.sqrt(self.sum_squares / self.count), STD_FLOOR)


def linear_action(
    weights: np.ndarray, obs_mean: np.ndarray, obs_std: np.ndarray, observation: np.ndarray
) -> np.ndarray:
    """:math:`\\mathrm{clip}(M (o - \\mu) / \\sigma, -1, 1)` for one observation ``(d_obs,)``."""
    return np.clip(weights @ ((observation - obs_mean) / obs_std), -1.0, 1.0)


def run_episode(
    env: gym.Env,
    policy: Callable[[np.ndarray], np.ndarray],
    seed: int,
    horizon: int,
    reward_shift: float = 0.0,
    action_noise: float = 0.0,
) -> tuple[float, np.ndarray]:
    """One episode from ``env.reset(seed=seed)`` for at most ``horizon`` steps (until
    termination): the return with ``reward_shift`` subtracted per step, and the observations
    the policy acted on ``(steps, d_obs)``. The executed action is ``clip(policy(obs) +
    action_noise · ε, -1, 1)``, ``ε`` drawn from ``default_rng([seed, 1])``."""
    obs, _ = env.reset(seed=seed)
    noise = action_noise * np.random.default_rng([seed, 1]).standard_normal(
        (horizon, *env.action_space.shape)
    )
    total = 0.0
    seen = []
    for step in range(horizon):
        seen.append(obs)
        action = np.clip(policy(obs) + noise[step], -1.0, 1.0)
        obs, reward, terminated, _, _ = env.step(action)
        total += float(reward) - reward_shift
        if terminated:
            break
    return total, np.asarray(seen)


@dataclass
class ARSResult:
    """Outcome of :func:`train_ars`: the best evaluated policy and the run's record.

    ``weights`` ``(d_act, d_obs)`` and ``moments`` (its observation statistics) define the
    policy; ``best_return`` is its evaluation mean return; ``history`` holds one
    ``(iteration, env_steps, eval_mean_return)`` per evaluation.
    """

    weights: np.ndarray
    moments: RunningMoments
    best_return: float = -np.inf
    env_steps: int = 0
    iterations: int = 0
    history: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def obs_mean(self) -> np.ndarray:
        """:math:`\\mu`, ``(d_obs,)``."""
        return self.moments.mean

    @property
    def obs_std(self) -> np.ndarray:
        """:math:`\\sigma`, ``(d_obs,)``."""
        return self.moments.std


def train_ars(
    env: gym.Env,
    config: ARSConfig,
    on_iteration: Callable[[int, int, float | None], None] | None = None,
    start: ARSResult | None = None,
) -> ARSResult:
    """Train a linear policy on ``env`` by ARS V2-t (module docs), from :math:`M = 0` or from
    ``start``'s policy and observation statistics (which are not modified).

    ``on_iteration(iteration, env_steps, eval_mean_return_or_None)`` is called after every
    iteration (for progress display).
    """
    rng = np.random.default_rng(config.seed)
    d_obs = env.observation_space.shape[0]
    d_act = env.action_space.shape[0]
    if start is None:
        weights, moments = np.zeros((d_act, d_obs)), RunningMoments(d_obs)
    else:
        weights, moments = start.weights.copy(), copy.deepcopy(start.moments)
    best = ARSResult(weights, copy.deepcopy(moments))
    steps, iteration = 0, 0
    while steps < config.max_steps:
        iteration += 1
        mean, std = moments.mean.copy(), moments.std
        deltas = rng.standard_normal((config.n_directions, d_act, d_obs))
        seeds = rng.integers(0, 2**31, config.n_directions)
        returns = np.zeros((config.n_directions, 2))
        for k, (delta, seed) in enumerate(zip(deltas, seeds, strict=True)):
            for j, sign in enumerate((1.0, -1.0)):
                perturbed = weights + sign * config.exploration_std * delta
                returns[k, j], seen = run_episode(
                    env,
                    partial(linear_action, perturbed, mean, std),
                    int(seed),
                    config.horizon,
                    config.reward_shift,
                    config.action_noise,
                )
                moments.update(seen)
                steps += len(seen)
        top = np.argsort(-returns.max(axis=1), kind="stable")[: config.top_directions]
        used = returns[top]
        scale = used.std()
        if scale > 0:
            step = np.tensordot(used[:, 0] - used[:, 1], deltas[top], axes=1)
            weights = weights + config.step_size / (config.top_directions * scale) * step
        score = None
        if iteration % config.eval_every == 0 or steps >= config.max_steps:
            score = evaluate_linear(env, weights, moments.mean, moments.std, rng, config)
            best.history.append((iteration, steps, score))
            if score > best.best_return:
                best.weights, best.moments = weights, copy.deepcopy(moments)
                best.best_return = score
        if on_iteration is not None:
            on_iteration(iteration, steps, score)
        if score is not None and score >= config.target_return:
            break
    best.env_steps, best.iterations = steps, iteration
    return best


def evaluate_linear(
    env: gym.Env,
    weights: np.ndarray,
    obs_mean: np.ndarray,
    obs_std: np.ndarray,
    rng: np.random.Generator,
    config: ARSConfig,
) -> float:
    """Mean unshifted return of the linear policy over ``config.eval_episodes`` episodes whose
    seeds are drawn from ``rng`` (actuator noise ``config.action_noise``)."""
    seeds = rng.integers(0, 2**31, config.eval_episodes)
    returns = [
        run_episode(
            env,
            partial(linear_action, weights, obs_mean, obs_std),
            int(s),
            config.horizon,
            action_noise=config.action_noise,
        )[0]
        for s in seeds
    ]
    return float(np.mean(returns))


__all__ = [
    "ARSConfig",
    "ARSResult",
    "RunningMoments",
    "evaluate_linear",
    "linear_action",
    "run_episode",
    "train_ars",
]
