"""Behavior cloning in MuJoCo: train a policy on expert actions, deploy it in closed loop.

Environments (Gymnasium v5, unmodified physics, observations and rewards):

``"pendulum"`` — ``InvertedDoublePendulum-v5`` (observation 9, action 1, 0.05 s per step). The
expert is the LQR balance controller of :class:`~beyondloss.tasks.experts.LQRExpert`. An episode
ends early when the tip falls to height 1 m or below; **success** means the pendulum stays up
for the whole episode. Reward: 10 per step alive minus small distance and velocity penalties, so
an episode kept up scores about 9.36 per step and a fall scores what was gathered before it.

``"reacher"`` — ``Reacher-v5`` (observation 10, action 2, 0.02 s per step, 50 steps). The expert
is inverse kinematics + joint PD (:class:`~beyondloss.tasks.experts.ReacherExpert`). Episodes
never end early; **success** means the fingertip is within :data:`REACHER_SUCCESS_DISTANCE` of
the target after the last step. Reward: minus the fingertip–target distance (m) minus the
squared command norm, per step.

``"hopper"`` — ``Hopper-v5`` (observation 11, action 3, 0.008 s per step, 1000 steps). The expert
is a committed linear policy trained by Augmented Random Search
(:class:`~beyondloss.tasks.experts.LinearExpert`, ``experiments/train_locomotion_experts.py``).
An episode ends early when the hopper falls (the environment's health check fails); **success**
means it never falls within the horizon. Reward: forward velocity (m/s) + 1 per step alive −
10⁻³ times the squared command norm.

``"halfcheetah"`` — ``HalfCheetah-v5`` (observation 17, action 6, 0.05 s per step, 1000 steps),
with a linear ARS expert as Hopper's. It cannot fall, so episodes never end early and there is
no success criterion. Reward: forward velocity (m/s) − 0.1 times the squared command norm.

The locomotion tasks are ranked by the **normalized score** :math:`(R - R_{\\text{random}}) /
(R_{\\text{expert}} - R_{\\text{random}})` (:func:`normalized_score`, the D4RL convention),
with reference returns measured by the training script at each size's horizon and evaluation
noise (:class:`Locomotion`): 0 is the uniform-random policy, 1 the expert.

Actuator noise. Every executed action is :math:`\\mathrm{clip}(a + \\sigma\\varepsilon, -1, 1)`
with :math:`\\varepsilon \\sim \\mathcal N(0, I)` drawn per episode from a generator seeded by the
episode's seed, so a rollout is a deterministic function of the policy. Demonstrations are
recorded with noise :math:`\\sigma_{\\text{demo}}` (the states the expert visits while its commands
are perturbed, labelled with its clean commands — noise injection in the spirit of DART, so the
demonstrations show recoveries) and the deployed policy runs with :math:`\\sigma_{\\text{eval}}`;
a larger :math:`\\sigma_{\\text{eval}}` makes deployment harder than the demonstrations.

Data. Episode seeds come from five disjoint ranges (see :func:`episode_seeds`): training
demonstrations, held-out demonstrations for the val and the test one-step loss, and val and test
evaluation episodes. Demonstrations are generated on first use and cached in memory per process
(a quick-size set takes about a second, so nothing is written to disk); environments are created
once per process and reused, each episode starting with ``reset(seed=...)``.

Model and loss. :class:`BCPolicy` standardizes the observation with the training
demonstrations' per-feature mean and standard deviation (floored at :data:`OBS_STD_FLOOR`) and
maps it through an MLP to the action. The one-step loss is the mean squared error to the expert
actions, averaged over batch and action dimensions, in squared control-range units.

Deployment. :meth:`BehaviorCloningTask.evaluate` rolls the policy out on the split's evaluation
episodes, all in lockstep (one batched forward per step over the episodes still running). The
policy's output is clipped to the action box only after the noise is added; a non-finite output
ends that episode as a failure.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import gymnasium as gym
import mujoco
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from beyondloss.tasks.base import ConfiguredTask, Splits, require_positive
from beyondloss.tasks.experts import LinearExpert, LQRExpert, ReacherExpert

REACHER_SUCCESS_DISTANCE = 0.01
"""Largest final fingertip–target distance (m) of a successful Reacher episode; the fingertip
and target spheres have radii 0.01 and 0.009 m."""

OBS_STD_FLOOR = 0.05
"""Smallest per-feature scale (observation units) of the policy's input standardization: keeps
near-constant demonstration features (cosines of small angles, the pendulum's constraint force)
from being amplified without bound."""

REFERENCE_EPISODES = 100
"""Episodes behind each reference return of :class:`Locomotion`."""

REFERENCE_SEED = 2**40
"""Episode ``i`` of the reference returns has seed ``REFERENCE_SEED + i``: outside the episode
seeds of every data seed below 200 000 (:func:`episode_seeds`)."""

SEED_RANGE = 2**20
"""Episodes per seed range; every count of demonstrations or evaluation episodes is below it."""

_NOISE_STREAM = 1
"""Second entropy word of the actuator-noise generator, ``default_rng([episode_seed, 1])``;
separates it from the environment's own generator (seeded with the episode seed alone)."""

_SEED_STREAMS = ("train", "val_demos", "test_demos", "val", "test")


def episode_seeds(data_seed: int, stream: str, count: int) -> list[int]:
    """Seeds of ``count`` episodes of ``stream``: ``(5 · data_seed + k) · 2**20 + i``.

    ``stream`` is one of ``"train"``, ``"val_demos"``, ``"test_demos"`` (demonstrations) and
    ``"val"``, ``"test"`` (evaluation episodes), ``k`` its index in that order, ``i < count``.
    Different streams and different data seeds never share a seed.
    """
    if stream not in _SEED_STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {', '.join(_SEED_STREAMS)}")
    if data_seed < 0:
        raise ValueError(f"data_seed must be non-negative, got {data_seed}")
    if not 0 <= count <= SEED_RANGE:
        raise ValueError(f"count must be in [0, {SEED_RANGE}], got {count}")
    base = (len(_SEED_STREAMS) * data_seed + _SEED_STREAMS.index(stream)) * SEED_RANGE
    return [base + i for i in range(count)]


@dataclass(frozen=True)
class Rollouts:
    """Outcome of :func:`rollout` for ``N`` episodes.

    Attributes
    ----------
    returns:
        Sum of rewards per episode, ``(N,)``.
    lengths:
        Steps taken per episode, ``(N,)`` int; the horizon unless the episode ended early.
    ended_early:
        ``(N,)`` bool: the environment terminated the episode or the policy output a non-finite
        action (that action is not executed).
    non_finite:
        ``(N,)`` bool: the episode ended on a non-finite action.
    final_observations:
        Last observation of every episode, ``(N, d_obs)``.
    observations, actions:
        With ``record``: every observation the policy acted on, ``(M, d_obs)``, and the policy's
        action there before noise and clipping, ``(M, d_act)``; ``M = lengths.sum()``, ordered by
        step and, within a step, by episode. Empty arrays without ``record``.
    """

    returns: np.ndarray
    lengths: np.ndarray
    ended_early: np.ndarray
    non_finite: np.ndarray
    final_observations: np.ndarray
    observations: np.ndarray
    actions: np.ndarray


def policy_dtype(policy: nn.Module) -> torch.dtype:
    """Dtype of ``policy``'s first parameter, else of its first floating buffer, else float32."""
    for tensor in (*policy.parameters(), *policy.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def rollout(
    policy: nn.Module,
    envs: Sequence[gym.Env],
    seeds: Sequence[int],
    horizon: int,
    action_noise: float = 0.0,
    record: bool = False,
) -> Rollouts:
    """Run ``len(seeds)`` episodes in lockstep, one batched ``policy`` forward per step.

    Episode ``i`` runs in ``envs[i]`` from ``reset(seed=seeds[i])`` for at most ``horizon``
    steps; the executed action is ``clip(policy(obs) + action_noise · ε, low, high)`` with the
    module-level noise convention. ``policy`` maps observations ``(B, d_obs)`` (its dtype, on
    the CPU) to actions ``(B, d_act)``; it is called under ``torch.no_grad`` as it is (the
    caller sets eval mode).
    """
    n = len(seeds)
    if not 1 <= n <= len(envs):
        raise ValueError(f"need 1 to {len(envs)} seeds (one per environment), got {n}")
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1, got {horizon}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be non-negative, got {action_noise}")
    space = envs[0].action_space
    low, high = space.low, space.high
    noise = action_noise * np.stack(
        [
            np.random.default_rng([seed, _NOISE_STREAM]).standard_normal((horizon, *space.shape))
            for seed in seeds
        ]
    )
    obs = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds, strict=False)])
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=np.int64)
    ended = np.zeros(n, dtype=bool)
    non_finite = np.zeros(n, dtype=bool)
    recorded_obs: list[np.ndarray] = []
    recorded_actions: list[np.ndarray] = []
    dtype = policy_dtype(policy)
    for step in range(horizon):
        running = np.flatnonzero(~ended)
        if running.size == 0:
            break
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs[running], dtype=dtype)).double().numpy()
        finite = np.isfinite(actions).all(axis=1)
        ended[running[~finite]] = True
        non_finite[running[~finite]] = True
        running, actions = running[finite], actions[finite]
        if record:
            recorded_obs.append(obs[running].copy())
            recorded_actions.append(actions.copy())
        executed = np.clip(actions + noise[running, step], low, high)
        for index, action in zip(running, executed, strict=True):
            obs[index], reward, terminated, _, _ = envs[index].step(action)
            returns[index] += reward
            lengths[index] += 1
            ended[index] = terminated
    return Rollouts(
        returns=returns,
        lengths=lengths,
        ended_early=ended,
        non_finite=non_finite,
        final_observations=obs,
        observations=_concatenate(recorded_obs, obs.shape[1]),
        actions=_concatenate(recorded_actions, space.shape[0]),
    )


def _concatenate(rows: list[np.ndarray], width: int) -> np.ndarray:
    """``rows`` stacked into ``(M, width)``; ``(0, width)`` when there are none."""
    return np.concatenate(rows) if rows else np.zeros((0, width))


def _warn_from_mujoco(message: str) -> None:
    warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


class ControlEnv(ABC):
    """One environment of the task family: its Gymnasium id, expert and success criterion.

    Attributes
    ----------
    gym_id:
        Gymnasium environment id.
    max_horizon:
        The environment's standard episode length (steps).
    extra_metrics:
        Environment-specific metric name → higher is better, reported beside ``return_mean``
        and ``success_rate``.
    reports_success:
        Whether ``success_rate`` is a metric (an environment where every episode that runs to
        its end succeeds, such as HalfCheetah, has no use for it).
    primary_metric:
        The metric a study ranks by: ``success_rate`` unless the environment says otherwise.
    """

    gym_id: str
    max_horizon: int
    extra_metrics: Mapping[str, bool]
    reports_success: bool = True
    primary_metric: str = "success_rate"

    def check_horizon(self, horizon: int) -> None:
        """Raise ``ValueError`` if the metrics are undefined at ``horizon`` steps: outside
        ``[1, max_horizon]``, and wherever the environment says so."""
        if not 1 <= horizon <= self.max_horizon:
            raise ValueError(f"horizon must be in [1, {self.max_horizon}], got {horizon}")

    def make(self) -> gym.Env:
        """A fresh environment, without Gymnasium's wrappers (the horizon is the caller's).

        MuJoCo's warnings while it compiles the model (``HalfCheetah-v5``'s asset uses the
        deprecated ``settotalmass``) become Python ``RuntimeWarning``\\ s, shown once per
        process, instead of a line on stdout and in ``MUJOCO_LOG.TXT`` per environment.
        """
        previous = mujoco.get_mju_user_warning()
        mujoco.set_mju_user_warning(_warn_from_mujoco)
        try:
            return gym.make(self.gym_id).unwrapped
        finally:
            mujoco.set_mju_user_warning(previous)

    @abstractmethod
    def expert(self, env: gym.Env) -> nn.Module:
        """The hand-built expert of this environment."""

    @abstractmethod
    def outcome(self, rollouts: Rollouts, horizon: int) -> tuple[np.ndarray, dict[str, float]]:
        """Success per episode ``(N,)`` bool, and the extra metrics over the episodes."""


class DoublePendulum(ControlEnv):
    """``InvertedDoublePendulum-v5`` balanced by LQR; success = never falls within the horizon.

    Extra metric ``episode_length``: mean steps before the fall (the horizon if none).
    """

    gym_id = "InvertedDoublePendulum-v5"
    max_horizon = 1000
    extra_metrics = MappingProxyType({"episode_length": True})

    def expert(self, env: gym.Env) -> nn.Module:
        """:class:`LQRExpert` linearized on ``env``'s model at its frame skip."""
        return LQRExpert.from_model(env.unwrapped.model, env.unwrapped.frame_skip)

    def outcome(self, rollouts: Rollouts, horizon: int) -> tuple[np.ndarray, dict[str, float]]:
        """Success: the episode ran all ``horizon`` steps."""
        success = ~rollouts.ended_early & (rollouts.lengths == horizon)
        return success, {"episode_length": float(rollouts.lengths.mean())}


class Reacher(ControlEnv):
    """``Reacher-v5`` driven by IK + PD; success = final fingertip–target distance below
    :data:`REACHER_SUCCESS_DISTANCE`.

    Extra metric ``final_distance``: mean final fingertip–target distance (m); an episode ended
    by a non-finite action counts as the arena's diameter, 0.6 m.
    """

    gym_id = "Reacher-v5"
    max_horizon = 50
    extra_metrics = MappingProxyType({"final_distance": False})

    def expert(self, env: gym.Env) -> nn.Module:
        """:class:`ReacherExpert` with the link lengths of ``env``'s model."""
        return ReacherExpert.from_model(env.unwrapped.model)

    def outcome(self, rollouts: Rollouts, horizon: int) -> tuple[np.ndarray, dict[str, float]]:
        """Final distance from the last observation's fingertip − target entries (8, 9)."""
        distance = np.linalg.norm(rollouts.final_observations[:, 8:10], axis=1)
        distance = np.where(rollouts.ended_early, 0.6, distance)
        success = ~rollouts.ended_early & (distance < REACHER_SUCCESS_DISTANCE)
        return success, {"final_distance": float(distance.mean())}


def normalized_score(returns: np.ndarray, random_return: float, expert_return: float) -> np.ndarray:
    """:math:`(R - R_{\\text{random}}) / (R_{\\text{expert}} - R_{\\text{random}})` per episode:
    0 scores as the uniform-random policy, 1 as the expert (the D4RL convention, unscaled)."""
    if not expert_return > random_return:
        raise ValueError(
            f"expert_return must exceed random_return, got {expert_return} <= {random_return}"
        )
    return (np.asarray(returns, dtype=np.float64) - random_return) / (expert_return - random_return)


class Locomotion(ControlEnv):
    """A MuJoCo locomotion environment cloned from a committed :class:`LinearExpert`; ranked by
    ``normalized_score``.

    Attributes
    ----------
    expert_name:
        The expert's file, ``experts_data/<expert_name>.npz``.
    reference_returns:
        Horizon (steps) → ``(R_random, R_expert)``: mean returns of the uniform-random policy and
        of the expert over :data:`REFERENCE_EPISODES` episodes at that horizon and at the sizes'
        :math:`\\sigma_{\\text{eval}}` (measured by ``experiments/train_locomotion_experts.py``).
        The normalized score is defined at these horizons only.
    """

    expert_name: str
    reference_returns: Mapping[int, tuple[float, float]]
    primary_metric = "normalized_score"

    def expert(self, env: gym.Env) -> nn.Module:
        """The committed :class:`LinearExpert` (its checksum verified)."""
        return LinearExpert.load(self.expert_name)

    def check_horizon(self, horizon: int) -> None:
        """Only horizons with reference returns have a normalized score."""
        super().check_horizon(horizon)
        if horizon not in self.reference_returns:
            known = ", ".join(str(h) for h in self.reference_returns)
            raise ValueError(
                f"{self.gym_id} has reference returns at horizons {known} only, got {horizon}"
            )

    def score(self, rollouts: Rollouts, horizon: int) -> float:
        """Mean normalized score at ``horizon``; an episode that ended on a non-finite action
        scores at most 0 (never better than the random policy)."""
        self.check_horizon(horizon)
        per_episode = normalized_score(rollouts.returns, *self.reference_returns[horizon])
        per_episode = np.where(rollouts.non_finite, np.minimum(per_episode, 0.0), per_episode)
        return float(per_episode.mean())


class Hopper(Locomotion):
    """``Hopper-v5``: success = never falls (the environment's health check holds for the
    whole horizon).

    Extra metrics ``normalized_score`` (primary) and ``episode_length``: mean steps before the
    fall (the horizon if none).
    """

    gym_id = "Hopper-v5"
    max_horizon = 1000
    expert_name = "hopper"
    extra_metrics = MappingProxyType({"normalized_score": True, "episode_length": True})
    reference_returns = MappingProxyType({300: (18.2, 850.2), 1000: (18.2, 3209.4)})
    """At :math:`\\sigma_{\\text{eval}} = 0.1`; the random policy falls within 300 steps."""

    def outcome(self, rollouts: Rollouts, horizon: int) -> tuple[np.ndarray, dict[str, float]]:
        """Success: the episode ran all ``horizon`` steps."""
        success = ~rollouts.ended_early & (rollouts.lengths == horizon)
        return success, {
            "normalized_score": self.score(rollouts, horizon),
            "episode_length": float(rollouts.lengths.mean()),
        }


class HalfCheetah(Locomotion):
    """``HalfCheetah-v5``: it cannot fall, so there is no success criterion; only a non-finite
    action ends an episode early.

    Extra metric ``normalized_score`` (primary).
    """

    gym_id = "HalfCheetah-v5"
    max_horizon = 1000
    expert_name = "halfcheetah"
    reports_success = False
    extra_metrics = MappingProxyType({"normalized_score": True})
    reference_returns = MappingProxyType({300: (-85.5, 1176.7), 1000: (-293.4, 4246.1)})
    """At :math:`\\sigma_{\\text{eval}} = 0.05`."""

    def outcome(self, rollouts: Rollouts, horizon: int) -> tuple[np.ndarray, dict[str, float]]:
        """Success (not reported): the episode ran all ``horizon`` steps."""
        success = ~rollouts.ended_early & (rollouts.lengths == horizon)
        return success, {"normalized_score": self.score(rollouts, horizon)}


ENVIRONMENTS: Mapping[str, ControlEnv] = MappingProxyType(
    {
        "pendulum": DoublePendulum(),
        "reacher": Reacher(),
        "hopper": Hopper(),
        "halfcheetah": HalfCheetah(),
    }
)
"""Environment name (as in :class:`ControlConfig`) → its description."""


_ENV_POOLS: dict[str, list[gym.Env]] = {}
"""Environment name → this process's environments of it, grown by :func:`environments`."""


def environments(env: str, count: int) -> list[gym.Env]:
    """``count`` environments of ``env``, shared within the process (MuJoCo models take ~10 ms
    each to build). Every user resets an episode with its seed before stepping it."""
    pool = _ENV_POOLS.setdefault(env, [])
    while len(pool) < count:
        pool.append(ENVIRONMENTS[env].make())
    return pool[:count]


@dataclass(frozen=True)
class ControlConfig:
    """Environment, data, model and budget of :class:`BehaviorCloningTask`.

    Attributes
    ----------
    env:
        A key of :data:`ENVIRONMENTS`: ``"pendulum"``, ``"reacher"``, ``"hopper"`` or
        ``"halfcheetah"``.
    seed:
        Data seed: it fixes every episode (see :func:`episode_seeds`).
    horizon:
        Steps per episode, demonstrations and evaluation alike; ``None`` for the environment's
        standard length (1000 pendulum, hopper and halfcheetah, 50 reacher). The locomotion
        environments accept only the horizons of their reference returns (300 and 1000).
    n_demos:
        Training demonstration episodes.
    n_heldout_demos:
        Held-out demonstration episodes for each of the val and test one-step losses.
    n_eval_episodes:
        Evaluation (rollout) episodes per split, val and test.
    demo_action_noise, eval_action_noise:
        Actuator-noise standard deviations :math:`\\sigma_{\\text{demo}}` (demonstrations,
        held-out ones included) and :math:`\\sigma_{\\text{eval}}` (evaluation), in units of
        the control range (commands lie in ``[-1, 1]``).
    hidden, depth:
        Width and number of hidden layers of the policy MLP (residual blocks of the
        ``"residual"`` policy).
    policy:
        ``"mlp"`` (:class:`BCPolicy`) or ``"residual"`` (:class:`ResidualPolicy`, the
        residual MLP of the DoPr paper's Humanoid experiment).
    epochs, batch_size:
        Training budget: passes over the training pairs, and pairs per optimizer step.
    """

    env: str = "pendulum"
    seed: int = 0
    horizon: int | None = 100
    n_demos: int = 50
    n_heldout_demos: int = 5
    n_eval_episodes: int = 50
    demo_action_noise: float = 0.02
    eval_action_noise: float = 0.15
    hidden: int = 64
    depth: int = 2
    policy: str = "mlp"
    epochs: int = 5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.env not in ENVIRONMENTS:
            raise ValueError(f"unknown env {self.env!r}; expected one of {', '.join(ENVIRONMENTS)}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        for name in ("n_demos", "n_heldout_demos", "n_eval_episodes"):
            if not 1 <= getattr(self, name) <= SEED_RANGE:
                raise ValueError(f"{name} must be in [1, {SEED_RANGE}], got {getattr(self, name)}")
        require_positive(self, ("hidden", "depth", "epochs", "batch_size"))
        if self.policy not in POLICIES:
            raise ValueError(
                f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}"
            )
        for name in ("demo_action_noise", "eval_action_noise"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and non-negative, got {value}")
        limit = ENVIRONMENTS[self.env].max_horizon
        if self.horizon is not None and not 1 <= self.horizon <= limit:
            raise ValueError(f"horizon must be in [1, {limit}] for {self.env}, got {self.horizon}")
        ENVIRONMENTS[self.env].check_horizon(self.episode_steps)

    @property
    def episode_steps(self) -> int:
        """Steps per episode: ``horizon``, or the environment's standard length."""
        return ENVIRONMENTS[self.env].max_horizon if self.horizon is None else self.horizon

    @classmethod
    def quick(cls, env: str = "pendulum", seed: int = 0) -> ControlConfig:
        """Study-sized (a run of ``epochs`` epochs with val and test rollouts after each takes
        a few seconds on one thread); see :data:`QUICK`."""
        return cls(env=env, seed=seed, **QUICK[env])

    @classmethod
    def full(cls, env: str = "pendulum", seed: int = 0) -> ControlConfig:
        """Reported size: standard episode lengths, more demonstrations and epochs; see
        :data:`FULL`."""
        return cls(env=env, seed=seed, **FULL[env])


QUICK: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        "pendulum": MappingProxyType({}),
        "reacher": MappingProxyType(
            {
                "horizon": None,
                "n_demos": 120,
                "n_heldout_demos": 20,
                "demo_action_noise": 0.1,
                "eval_action_noise": 0.05,
                "epochs": 10,
            }
        ),
        **{
            env: MappingProxyType(
                {
                    "horizon": 300,
                    "n_demos": 5,
                    "n_heldout_demos": 2,
                    "n_eval_episodes": 16,
                    "demo_action_noise": demo_noise,
                    "eval_action_noise": eval_noise,
                    "epochs": 5,
                    "batch_size": 32,
                }
            )
            for env, demo_noise, eval_noise in (("hopper", 0.02, 0.1), ("halfcheetah", 0.01, 0.05))
        },
    }
)
"""Per-environment overrides of :class:`ControlConfig`'s defaults at the quick size.

- ``pendulum`` — the defaults: 100-step episodes (5 s), 50 demonstrations (5000 pairs) at
  :math:`\\sigma_{\\text{demo}} = 0.02`, deployment at :math:`\\sigma_{\\text{eval}} = 0.15`
  (7.5 times the demonstrations' noise, so the deployed policy meets states the demonstrations
  never showed; the expert still balances in 100 of 100 episodes), 50 evaluation episodes per
  split, 5 epochs of 79 steps. A successful episode costs 100 environment steps (5 RK4 physics
  steps each), so the rollouts dominate a run's time.
- ``reacher`` — standard 50-step episodes, 120 demonstrations (6000 pairs) at
  :math:`\\sigma_{\\text{demo}} = 0.1` (coverage), deployment at :math:`\\sigma_{\\text{eval}} =
  0.05`, where the expert succeeds in 98 of 100 episodes; success needs the fingertip within
  1 cm, which a cloned policy reaches only with a precise fit. 50 evaluation episodes per split,
  10 epochs of 94 steps.
- ``hopper``, ``halfcheetah`` — 300-step episodes (a reference horizon), 5 demonstrations
  (1500 pairs) at :math:`\\sigma_{\\text{demo}} = 0.02` (hopper) and 0.01 (halfcheetah),
  deployment at five times that, :math:`\\sigma_{\\text{eval}} = 0.1` and 0.05, where the
  expert keeps its gait (hopper: no fall in 100 of 100 1000-step episodes; see
  ``docs/locomotion.md``). 16 evaluation episodes per split, 5 epochs of 47 steps of batch 32.
  A run takes about 6 s (hopper) and 4 s (halfcheetah) on one thread, rollouts included.
"""

FULL: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        "pendulum": MappingProxyType(
            {
                "horizon": None,
                "n_demos": 10,
                "n_heldout_demos": 5,
                "eval_action_noise": 0.1,
                "epochs": 10,
            }
        ),
        "reacher": MappingProxyType(
            {
                "horizon": None,
                "n_demos": 150,
                "n_heldout_demos": 30,
                "n_eval_episodes": 100,
                "demo_action_noise": 0.1,
                "eval_action_noise": 0.05,
                "epochs": 15,
            }
        ),
        **{
            env: MappingProxyType(
                {
                    "horizon": None,
                    "n_demos": 4,
                    "n_heldout_demos": 3,
                    "n_eval_episodes": 16,
                    "demo_action_noise": demo_noise,
                    "eval_action_noise": eval_noise,
                    "epochs": 8,
                }
            )
            for env, demo_noise, eval_noise in (("hopper", 0.02, 0.1), ("halfcheetah", 0.01, 0.05))
        },
    }
)
"""Per-environment overrides of :class:`ControlConfig`'s defaults at the full size.

- ``pendulum`` — the standard 1000-step episodes (50 s), where errors have ten times longer to
  compound: 10 demonstrations (10 000 pairs) at :math:`\\sigma_{\\text{demo}} = 0.02`,
  deployment at :math:`\\sigma_{\\text{eval}} = 0.1` (over 1000 steps the expert balances in
  100 of 100 episodes at 0.1 but 99 at 0.15), 50 evaluation episodes per split (a successful one
  costs 1000 steps), 10 epochs of 157 steps.
- ``reacher`` — 150 demonstrations (7500 pairs), 100 evaluation episodes per split, 15 epochs of
  118 steps; noise as at the quick size.
- ``hopper``, ``halfcheetah`` — the standard 1000-step episodes, 4 demonstrations (4000
  pairs), 16 evaluation episodes per split, 8 epochs of 63 steps; noise as at the quick size.
  With 10 demonstrations both tasks saturated (AdamW reached the expert's score); with 4,
  AdamW at lr 1e-3 ends at 0.78 (hopper) and 0.97 (halfcheetah) of the expert
  (``docs/locomotion.md``). The rollouts dominate a run's time.
"""


class BCPolicy(nn.Module):
    """MLP policy :math:`a = \\mathrm{MLP}((o - \\mu) / s)` on raw observations.

    Input ``(B, d_obs)`` in the environment's units, output ``(B, d_act)`` in control-range
    units (unclipped). :math:`\\mu, s` (shape ``(d_obs,)``) are fixed buffers: the training
    demonstrations' mean and floored standard deviation. Hidden layers are ``nn.Linear`` +
    GELU.
    """

    def __init__(
        self, obs_mean: torch.Tensor, obs_scale: torch.Tensor, act_dim: int, hidden: int, depth: int
    ) -> None:
        super().__init__()
        obs_dim = obs_mean.shape[0]
        widths = [obs_dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.GELU()]
        layers.append(nn.Linear(widths[-1], act_dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("obs_mean", obs_mean.detach().clone())
        self.register_buffer("obs_scale", obs_scale.detach().clone())

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Actions ``(B, d_act)`` for observations ``(B, d_obs)``."""
        return self.net((observation - self.obs_mean) / self.obs_scale)


class ResidualPolicy(nn.Module):
    """Residual MLP policy on standardized observations, :math:`z = (o - \\mu) / s`:

    .. code-block:: text

        h_0 = W_in z
        h_k = h_{k-1} + W_k2 GELU(W_k1 LayerNorm(h_{k-1}))     k = 1..depth
        a   = W_out LayerNorm(h_depth)

    every block ``hidden → 2·hidden → hidden``. Same input and output convention as
    :class:`BCPolicy`. AP preconditions every ``nn.Linear``; the LayerNorm gains go to the base
    optimizer alone.
    """

    def __init__(
        self, obs_mean: torch.Tensor, obs_scale: torch.Tensor, act_dim: int, hidden: int, depth: int
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(obs_mean.shape[0], hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden),
                nn.Linear(hidden, 2 * hidden),
                nn.GELU(),
                nn.Linear(2 * hidden, hidden),
            )
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, act_dim))
        self.register_buffer("obs_mean", obs_mean.detach().clone())
        self.register_buffer("obs_scale", obs_scale.detach().clone())

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Actions ``(B, d_act)`` for observations ``(B, d_obs)``."""
        h = self.embed((observation - self.obs_mean) / self.obs_scale)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


POLICIES = {"mlp": BCPolicy, "residual": ResidualPolicy}
"""Policy architectures of :attr:`ControlConfig.policy`."""


@dataclass(frozen=True)
class Demonstrations:
    """Expert demonstrations of one :class:`ControlConfig`.

    ``splits`` holds ``(observation, expert action)`` pairs, float32, shapes ``(N, d_obs)`` and
    ``(N, d_act)``; ``obs_mean`` and ``obs_scale`` (``(d_obs,)``, float32) standardize the
    policy input; ``expert_returns`` and ``expert_success`` (``(n_demos,)``) score the training
    demonstrations themselves.
    """

    splits: Splits
    obs_mean: torch.Tensor
    obs_scale: torch.Tensor
    expert_returns: np.ndarray
    expert_success: np.ndarray


_DATA_FIELDS = ("env", "seed", "horizon", "n_demos", "n_heldout_demos", "demo_action_noise")
"""The :class:`ControlConfig` fields that shape the demonstrations."""

_DEMONSTRATIONS: dict[tuple[object, ...], Demonstrations] = {}
"""This process's demonstrations, keyed by the values of :data:`_DATA_FIELDS`."""


def demonstrations(config: ControlConfig) -> Demonstrations:
    """The expert demonstrations of ``config``, generated once per process and then cached.

    Configs that agree on the data fields (env, seed, horizon, demonstration counts and noise)
    share one generation.
    """
    key = tuple(getattr(config, name) for name in _DATA_FIELDS)
    if key not in _DEMONSTRATIONS:
        _DEMONSTRATIONS[key] = generate_demonstrations(config)
    return _DEMONSTRATIONS[key]


def generate_demonstrations(config: ControlConfig) -> Demonstrations:
    """Roll the expert out on the training and held-out demonstration episodes of ``config``
    (actuator noise ``demo_action_noise``), recording its clean actions; not cached."""
    spec = ENVIRONMENTS[config.env]
    steps = config.episode_steps
    envs = environments(config.env, max(config.n_demos, config.n_heldout_demos))
    expert = spec.expert(envs[0])
    runs = {
        stream: rollout(
            expert,
            envs,
            episode_seeds(config.seed, stream, count),
            steps,
            config.demo_action_noise,
            record=True,
        )
        for stream, count in (
            ("train", config.n_demos),
            ("val_demos", config.n_heldout_demos),
            ("test_demos", config.n_heldout_demos),
        )
    }
    pairs = {
        stream: TensorDataset(
            torch.from_numpy(run.observations).float(), torch.from_numpy(run.actions).float()
        )
        for stream, run in runs.items()
    }
    train_obs = pairs["train"].tensors[0]
    success, _ = spec.outcome(runs["train"], steps)
    return Demonstrations(
        splits=Splits(train=pairs["train"], val=pairs["val_demos"], test=pairs["test_demos"]),
        obs_mean=train_obs.mean(dim=0),
        obs_scale=train_obs.std(dim=0).clamp_min(OBS_STD_FLOOR),
        expert_returns=runs["train"].returns,
        expert_success=success,
    )


class BehaviorCloningTask(ConfiguredTask):
    """Behavior cloning of an expert in a MuJoCo environment (see module docs).

    Metrics of :meth:`evaluate` over the split's evaluation episodes:

    - ``success_rate``: fraction of successful episodes (per-environment criterion; not on
      HalfCheetah) — primary on pendulum and reacher;
    - ``return_mean``: mean undiscounted return;
    - the environment's extra metrics (``episode_length``, ``final_distance`` or
      ``normalized_score``, primary on hopper and halfcheetah).

    :attr:`primary_metric` is the environment's (:attr:`ControlEnv.primary_metric`).
    """

    def __init__(self, config: ControlConfig | None = None) -> None:
        self.config = ControlConfig.quick() if config is None else config
        self.environment = ENVIRONMENTS[self.config.env]
        self.name = f"bc-{self.config.env}"
        self.primary_metric = self.environment.primary_metric
        success = {"success_rate": True} if self.environment.reports_success else {}
        self.higher_is_better = MappingProxyType(
            success | {"return_mean": True} | dict(self.environment.extra_metrics)
        )

    def splits(self) -> Splits:
        """``(observation, expert action)`` pairs per split (float32, ``(N, d_obs)`` and
        ``(N, d_act)``): train from ``n_demos`` episodes, val and test from ``n_heldout_demos``
        held-out episodes each (at most ``episode_steps`` pairs per episode)."""
        return demonstrations(self.config).splits

    def make_model(self) -> nn.Module:
        """A fresh policy of ``config.policy`` (:class:`BCPolicy`: d_obs → hidden × depth →
        d_act; or :class:`ResidualPolicy`); global torch RNG."""
        data = demonstrations(self.config)
        act_dim = data.splits.train.tensors[1].shape[1]
        return POLICIES[self.config.policy](
            data.obs_mean, data.obs_scale, act_dim, self.config.hidden, self.config.depth
        )

    def expert(self) -> nn.Module:
        """The expert the demonstrations come from (usable wherever a policy is)."""
        return self.environment.expert(environments(self.config.env, 1)[0])

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        """MSE to the expert actions; ``batch = (observations (B, d_obs), actions (B, d_act))``;
        returns a scalar in squared control-range units."""
        observation, action = batch
        return (model(observation) - action).square().mean()

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """Rollout metrics of ``model`` deployed on ``split`` ("val" or "test"); class docs. Every
        metric comes from the same rollouts, so ``primary_only`` changes nothing.

        The model runs in eval mode on the CPU in the dtype of :func:`policy_dtype`; its training
        mode is restored afterwards.
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        config = self.config
        seeds = episode_seeds(config.seed, split, config.n_eval_episodes)
        envs = environments(config.env, config.n_eval_episodes)
        was_training = model.training
        model.eval()
        try:
            result = rollout(model, envs, seeds, config.episode_steps, config.eval_action_noise)
        finally:
            model.train(was_training)
        success, extra = self.environment.outcome(result, config.episode_steps)
        metrics = {
            "success_rate": float(success.mean()),
            "return_mean": float(result.returns.mean()),
        } | extra
        return {name: metrics[name] for name in self.higher_is_better}


def make_control_task(size: str, data_seed: int, env: str) -> BehaviorCloningTask:
    """Behavior cloning on ``env`` at ``size`` (``"quick"`` or ``"full"``) with data seed
    ``data_seed``: the registry's factory (bind ``env``)."""
    makers: dict[str, Callable[[str, int], ControlConfig]] = {
        "quick": ControlConfig.quick,
        "full": ControlConfig.full,
    }
    if size not in makers:
        raise ValueError(f"unknown task size {size!r}; expected one of {', '.join(makers)}")
    return BehaviorCloningTask(makers[size](env, data_seed))


__all__ = [
    "ENVIRONMENTS",
    "FULL",
    "QUICK",
    "BCPolicy",
    "POLICIES",
    "ResidualPolicy",
    "BehaviorCloningTask",
    "ControlConfig",
    "ControlEnv",
    "Demonstrations",
    "DoublePendulum",
    "Reacher",
    "Rollouts",
    "demonstrations",
    "environments",
    "episode_seeds",
    "generate_demonstrations",
    "make_control_task",
    "policy_dtype",
    "rollout",
]
