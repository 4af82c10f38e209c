"""Train the locomotion experts of the ``bc-hopper`` and ``bc-halfcheetah`` tasks and measure
their reference returns.

For each environment: Augmented Random Search (``beyondloss.tasks.ars``, stages
:data:`EXPERT_STAGES`) trains a linear policy, first without actuator noise, then under actuator
noise; the best evaluated policy of the last stage is written,
byte-reproducibly, to ``src/beyondloss/tasks/experts_data/<env>.npz`` and its SHA-256 printed
(record it in ``beyondloss.tasks.expert_files.EXPERT_SHA256``). Then the expert and the
uniform-random policy are rolled out on ``REFERENCE_EPISODES`` episodes (seeds
``REFERENCE_SEED + i``) at every task size's horizon and evaluation noise, and their mean
returns printed in the form of ``reference_returns`` in ``beyondloss.tasks.control``
(horizon → (R_random, R_expert)).

    python experiments/train_locomotion_experts.py --env all
    python experiments/train_locomotion_experts.py --env all --references-only --robustness

Runs on one core; see docs/locomotion.md for wall times and the numbers it printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from beyondloss.tasks.ars import ARSConfig, train_ars
from beyondloss.tasks.control import (
    ENVIRONMENTS,
    FULL,
    QUICK,
    REFERENCE_EPISODES,
    REFERENCE_SEED,
    ControlConfig,
    environments,
    rollout,
)
from beyondloss.tasks.expert_files import (
    EXPERT_SHA256,
    ExpertFile,
    expert_path,
    read_expert_file,
    write_expert_file,
)
from beyondloss.tasks.experts import LinearExpert

_HOPPER = ARSConfig(
    n_directions=8,
    top_directions=4,
    step_size=0.01,
    exploration_std=0.025,
    reward_shift=1.0,
    max_steps=3_000_000,
    target_return=3000.0,
    eval_every=10,
    eval_episodes=10,
    seed=0,
)
_HALFCHEETAH = ARSConfig(
    n_directions=32,
    top_directions=4,
    step_size=0.02,
    exploration_std=0.03,
    max_steps=4_000_000,
    target_return=3500.0,
    eval_every=5,
    eval_episodes=5,
    seed=0,
)

EXPERT_STAGES = {
    "hopper": (
        _HOPPER,
        dataclasses.replace(_HOPPER, action_noise=0.1, target_return=3200.0, seed=1),
    ),
    "halfcheetah": (
        _HALFCHEETAH,
        dataclasses.replace(
            _HALFCHEETAH,
            step_size=0.01,
            action_noise=0.1,
            target_return=4500.0,
            eval_episodes=10,
            seed=1,
        ),
    ),
}
"""ARS stages per environment, each continuing from the previous one's best policy: first
without actuator noise, with Mania et al.'s (2018, table 9) V2-t settings for Hopper and
HalfCheetah (Hopper's survival bonus 1 shifted out), then under actuator noise 0.1 (HalfCheetah
with half the step size), so that the expert keeps its gait when deployed with noise (0.1 in
``bc-hopper``, 0.05 in ``bc-halfcheetah``)."""


ROBUSTNESS_NOISE = (0.0, 0.05, 0.1, 0.2)
"""Actuator noise levels of ``--robustness``."""


class UniformPolicy(nn.Module):
    """Actions drawn uniformly from ``[-1, 1]^{d_act}``, from a generator seeded once."""

    def __init__(self, act_dim: int, seed: int) -> None:
        super().__init__()
        self.act_dim = act_dim
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        shape = (observation.shape[0], self.act_dim)
        return torch.rand(shape, generator=self.generator, dtype=torch.float64) * 2.0 - 1.0


def size_settings(env: str) -> list[tuple[int, float]]:
    """Distinct ``(horizon, eval_action_noise)`` of ``env``'s quick and full sizes."""
    defaults = {f.name: f.default for f in dataclasses.fields(ControlConfig)}
    settings = []
    for overrides in (QUICK[env], FULL[env]):
        values = defaults | dict(overrides)
        horizon = values["horizon"] or ENVIRONMENTS[env].max_horizon
        settings.append((horizon, values["eval_action_noise"]))
    return sorted(set(settings))


def _progress(bar: tqdm, offset: int, stage: int) -> Callable[[int, int, float | None], None]:
    """ARS progress callback moving ``bar`` to ``offset`` + the stage's steps."""

    def progress(iteration: int, steps: int, score: float | None) -> None:
        bar.update(offset + steps - bar.n)
        if score is not None:
            bar.set_postfix(stage=stage, iteration=iteration, eval_return=f"{score:.0f}")

    return progress


def train(env: str, out_dir: Path) -> Path:
    """Train ``env``'s expert through its stages, write its file into ``out_dir``; returns the
    path."""
    stages = EXPERT_STAGES[env]
    started = time.perf_counter()
    bar = tqdm(total=sum(c.max_steps for c in stages), desc=f"ARS {env}", unit="step")
    result, done, record = None, 0, []
    for number, config in enumerate(stages, start=1):
        progress = _progress(bar, done, number)
        result = train_ars(ENVIRONMENTS[env].make(), config, progress, start=result)
        done += result.env_steps
        record.append(
            {
                "ars_config": dataclasses.asdict(config),
                "env_steps": result.env_steps,
                "iterations": result.iterations,
                "eval_mean_return": result.best_return,
                "history": result.history,
            }
        )
        tqdm.write(
            f"{env} stage {number}: best evaluation return {result.best_return:.1f} "
            f"(noise {config.action_noise}) after {result.env_steps} environment steps, "
            f"{result.iterations} iterations"
        )
    bar.close()
    metadata = {"gym_id": ENVIRONMENTS[env].gym_id, "env_steps": done, "stages": record}
    path = out_dir / f"{env}.npz"
    stored = ExpertFile(result.weights, result.obs_mean, result.obs_std, metadata)
    sha = write_expert_file(path, stored)
    print(
        f"{env}: {done} training environment steps in {time.perf_counter() - started:.0f} s\n"
        f"{path.name} SHA-256 {sha}"
    )
    return path


def references(env: str, path: Path, sha256: str | None) -> None:
    """Print the mean ± std returns of the expert at ``path`` (checksum ``sha256`` verified
    unless ``None``) and of the uniform-random policy at every size setting of ``env``, and the
    resulting ``reference_returns`` entry."""
    stored = read_expert_file(path, sha256, env)
    expert = LinearExpert.from_file(stored)
    seeds = [REFERENCE_SEED + i for i in range(REFERENCE_EPISODES)]
    envs = environments(env, REFERENCE_EPISODES)
    table = {}
    for horizon, noise in size_settings(env):
        means = []
        for name, policy in (
            ("random", UniformPolicy(stored.weights.shape[0], seed=0)),
            ("expert", expert),
        ):
            run = rollout(policy, envs, seeds, horizon, noise)
            means.append(float(run.returns.mean()))
            print(
                f"{env} {name:6s} horizon {horizon:4d} noise {noise}: return "
                f"{run.returns.mean():.1f} ± {run.returns.std():.1f} over {len(seeds)} episodes, "
                f"{np.mean(run.lengths == horizon):.2f} ran the whole horizon"
            )
        table[horizon] = (round(means[0], 1), round(means[1], 1))
    print(f"{env} reference_returns = {table}")


def robustness(env: str, path: Path) -> None:
    """Print the expert's returns over the standard horizon at actuator noise
    :data:`ROBUSTNESS_NOISE` (same episodes as the references)."""
    expert = LinearExpert.from_file(read_expert_file(path, None, env))
    seeds = [REFERENCE_SEED + i for i in range(REFERENCE_EPISODES)]
    horizon = ENVIRONMENTS[env].max_horizon
    envs = environments(env, REFERENCE_EPISODES)
    for noise in ROBUSTNESS_NOISE:
        run = rollout(expert, envs, seeds, horizon, noise)
        print(
            f"{env} expert horizon {horizon} noise {noise}: return {run.returns.mean():.1f} ± "
            f"{run.returns.std():.1f} (min {run.returns.min():.1f}), "
            f"{np.mean(run.lengths == horizon):.2f} ran the whole horizon"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=[*EXPERT_STAGES, "all"], default="all")
    parser.add_argument(
        "--out-dir", type=Path, default=expert_path("hopper").parent, help="expert file folder"
    )
    parser.add_argument(
        "--references-only",
        action="store_true",
        help="skip training; measure the reference returns of the file in --out-dir",
    )
    parser.add_argument(
        "--robustness",
        action="store_true",
        help=f"also print the expert's returns at actuator noise {ROBUSTNESS_NOISE}",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list(EXPERT_STAGES) if args.env == "all" else [args.env]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for env in names:
        if args.references_only:
            path = args.out_dir / f"{env}.npz"
            references(env, path, EXPERT_SHA256.get(env))
        else:
            path = train(env, args.out_dir)
            references(env, path, None)
        if args.robustness:
            robustness(env, path)


if __name__ == "__main__":
    main()
