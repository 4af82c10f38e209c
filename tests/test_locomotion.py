"""Locomotion behavior cloning: committed ARS experts, their checksums, the normalized score."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from beyondloss.tasks import make_task
from beyondloss.tasks.ars import ARSConfig, RunningMoments, train_ars
from beyondloss.tasks.control import (
    ENVIRONMENTS,
    BehaviorCloningTask,
    ControlConfig,
    normalized_score,
)
from beyondloss.tasks.expert_files import (
    EXPERT_SHA256,
    expert_path,
    file_sha256,
    load_expert,
    read_expert_file,
    write_expert_file,
)
from beyondloss.train import TrainConfig, train

SHORT_HORIZON = 300
"""The quick size's horizon, where reference returns are recorded."""

MINIMUM_EXPERT_RETURN = {"hopper": 750.0, "halfcheetah": 900.0}
"""Documented floor of the experts' mean return over 300 steps at the evaluation noise
(docs/locomotion.md): about 90 % of their measured reference return there."""


def short(env: str, **changes: object) -> ControlConfig:
    """A small config of ``env`` at the short horizon: 2 demonstrations, 6 evaluation episodes."""
    config = ControlConfig(
        env=env,
        horizon=SHORT_HORIZON,
        n_demos=2,
        n_heldout_demos=1,
        n_eval_episodes=6,
        eval_action_noise=0.1,
        epochs=1,
    )
    return dataclasses.replace(config, **changes)


class Uniform(nn.Module):
    """Uniformly random actions in ``[-1, 1]``, from a generator seeded once."""

    def __init__(self, act_dim: int) -> None:
        super().__init__()
        self.act_dim = act_dim
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        shape = (observation.shape[0], self.act_dim)
        return torch.rand(shape, generator=self.generator, dtype=torch.float64) * 2 - 1


class NotANumber(nn.Module):
    """A policy answering every observation with NaN commands."""

    def __init__(self, act_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((act_dim,), float("nan")))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(observation.shape[0], -1)


def test_committed_experts_match_their_recorded_checksums() -> None:
    assert set(EXPERT_SHA256) == {"hopper", "halfcheetah"}
    for name, sha in EXPERT_SHA256.items():
        assert file_sha256(expert_path(name)) == sha
        stored = load_expert(name)
        assert stored.metadata["gym_id"] == ENVIRONMENTS[name].gym_id
        assert stored.weights.shape[1] == stored.obs_mean.shape[0] == stored.obs_std.shape[0]


def test_a_tampered_expert_file_is_refused(tmp_path) -> None:
    copy = tmp_path / "hopper.npz"
    shutil.copyfile(expert_path("hopper"), copy)
    read_expert_file(copy, EXPERT_SHA256["hopper"], "hopper")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"hopper\.npz: SHA-256 .*train_locomotion_experts\.py"):
        read_expert_file(copy, EXPERT_SHA256["hopper"], "hopper")
    with pytest.raises(ValueError, match="unknown expert"):
        load_expert("walker")


def test_rewriting_an_expert_reproduces_its_bytes(tmp_path) -> None:
    for name in EXPERT_SHA256:
        assert write_expert_file(tmp_path / f"{name}.npz", load_expert(name)) == EXPERT_SHA256[name]


@pytest.mark.parametrize("env", ["hopper", "halfcheetah"])
def test_expert_beats_its_documented_minimum_and_random_scores_near_zero(env: str) -> None:
    task = BehaviorCloningTask(short(env))
    expert = task.evaluate(task.expert(), "test")
    act_dim = task.splits().train.tensors[1].shape[1]
    uniform = task.evaluate(Uniform(act_dim), "test")
    assert expert["return_mean"] >= MINIMUM_EXPERT_RETURN[env]
    assert expert["normalized_score"] > 0.9
    assert abs(uniform["normalized_score"]) < 0.2
    assert uniform["return_mean"] < expert["return_mean"]
    if env == "hopper":
        assert expert["success_rate"] == 1.0
        assert expert["episode_length"] == SHORT_HORIZON
        assert uniform["success_rate"] == 0.0


def test_non_finite_actions_score_no_better_than_random() -> None:
    for env, act_dim in (("hopper", 3), ("halfcheetah", 6)):
        metrics = BehaviorCloningTask(short(env)).evaluate(NotANumber(act_dim), "val")
        assert metrics["return_mean"] == 0.0
        assert metrics["normalized_score"] <= 0.0


def test_normalized_score_is_zero_at_random_and_one_at_expert() -> None:
    scores = normalized_score(np.array([-50.0, 150.0, 50.0, 350.0]), -50.0, 150.0)
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="expert_return must exceed"):
        normalized_score(np.zeros(1), 10.0, 10.0)


def test_tasks_have_shapes_metrics_and_primary_metric_of_their_environment() -> None:
    hopper = make_task("bc-hopper", "quick", 0)
    cheetah = make_task("bc-halfcheetah", "quick", 0)
    assert hopper.primary_metric == cheetah.primary_metric == "normalized_score"
    assert set(hopper.higher_is_better) == {
        "success_rate",
        "return_mean",
        "normalized_score",
        "episode_length",
    }
    assert set(cheetah.higher_is_better) == {"return_mean", "normalized_score"}
    assert make_task("bc-pendulum").primary_metric == "success_rate"
    config = hopper.config
    observations, actions = hopper.splits().train.tensors
    assert observations.shape[1] == 11 and actions.shape[1] == 3
    assert observations.shape[0] <= config.n_demos * config.episode_steps
    assert cheetah.splits().val.tensors[0].shape == (config.n_heldout_demos * 300, 17)
    with pytest.raises(ValueError, match="reference returns at horizons"):
        ControlConfig(env="hopper", horizon=123)


def test_one_quick_epoch_trains_through_the_loop() -> None:
    task = BehaviorCloningTask(short("hopper", n_demos=3))
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def evaluate(net: nn.Module, epoch: int) -> dict[str, float]:
        return {f"val_{k}": v for k, v in task.evaluate(net, "val").items()}

    history = train(
        model,
        optimizer,
        task.splits().train,
        task.loss,
        TrainConfig(epochs=1, batch_size=64),
        [evaluate],
        progress=False,
    )
    assert np.isfinite(history[0]["train_loss"])
    assert set(history[0]) >= {f"val_{k}" for k in task.higher_is_better}


def test_running_moments_merge_batches_like_one_pass() -> None:
    rows = np.random.default_rng(0).normal(3.0, 2.0, (100, 4))
    moments = RunningMoments(4)
    for batch in (rows[:7], rows[7:7], rows[7:60], rows[60:]):
        moments.update(batch)
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, rows.std(axis=0), rtol=1e-12)


def test_ars_is_deterministic_by_seed_and_validates_its_config() -> None:
    config = ARSConfig(n_directions=2, top_directions=1, horizon=50, max_steps=400, eval_every=2)
    env = ENVIRONMENTS["hopper"].make()
    first, again = train_ars(env, config), train_ars(env, config)
    other = train_ars(env, dataclasses.replace(config, seed=1))
    assert np.array_equal(first.weights, again.weights) and first.weights.any()
    assert first.history == again.history
    assert not np.array_equal(first.weights, other.weights)
    with pytest.raises(ValueError, match="top_directions"):
        ARSConfig(n_directions=2, top_directions=3)
    with pytest.raises(ValueError, match="action_noise"):
        ARSConfig(action_noise=-0.1)
