"""Behavior cloning in MuJoCo: experts, deterministic demonstrations, rollout metrics."""

import dataclasses

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from torch import nn

from beyondloss.tasks.base import Task
from beyondloss.tasks.control import (
    REACHER_SUCCESS_DISTANCE,
    BehaviorCloningTask,
    ControlConfig,
    episode_seeds,
    generate_demonstrations,
    make_control_task,
)
from beyondloss.tasks.experts import LQRExpert, linearize_step, lqr_gain, two_link_ik

PENDULUM = ControlConfig(
    env="pendulum", horizon=100, n_demos=2, n_heldout_demos=1, n_eval_episodes=8, epochs=1
)
REACHER = ControlConfig(
    env="reacher",
    horizon=None,
    n_demos=3,
    n_heldout_demos=2,
    n_eval_episodes=8,
    eval_action_noise=0.05,
)


class Constant(nn.Module):
    """A policy answering every observation with the same action (zeros, or NaN)."""

    def __init__(self, act_dim: int, value: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((act_dim,), value))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(observation.shape[0], -1)


def plain_episode(config: ControlConfig, policy: nn.Module, seed: int) -> tuple[float, int, bool]:
    """One episode in a standard ``gym.make`` environment, written out step by step:
    return, steps taken, and whether the environment terminated it."""
    env = gym.make(BehaviorCloningTask(config).environment.gym_id)
    obs, _ = env.reset(seed=seed)
    shape = (config.episode_steps, *env.action_space.shape)
    noise = config.eval_action_noise * np.random.default_rng([seed, 1]).standard_normal(shape)
    total, steps, terminated = 0.0, 0, False
    while steps < config.episode_steps and not terminated:
        with torch.no_grad():
            action = policy(torch.as_tensor(obs[None], dtype=torch.float64))[0].numpy()
        action = np.clip(action + noise[steps], -1.0, 1.0)
        obs, reward, terminated, _, _ = env.step(action)
        total += float(reward)
        steps += 1
    env.close()
    return total, steps, terminated


def test_episode_seeds_are_disjoint_across_streams_and_data_seeds() -> None:
    streams = ("train", "val_demos", "test_demos", "val", "test")
    seen = [set(episode_seeds(data_seed, s, 50)) for data_seed in (0, 1) for s in streams]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 500


def test_demonstrations_are_deterministic_by_seed() -> None:
    first = generate_demonstrations(REACHER)
    again = generate_demonstrations(REACHER)
    other = generate_demonstrations(dataclasses.replace(REACHER, seed=1))
    for split in ("train", "val", "test"):
        a, b = getattr(first.splits, split).tensors, getattr(again.splits, split).tensors
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert first.splits.train.tensors[0].shape == (3 * 50, 10)
    assert first.splits.val.tensors[1].shape == (2 * 50, 2)
    assert not torch.equal(first.splits.train.tensors[0], other.splits.train.tensors[0])


def test_lqr_linearization_leaves_model_alone_and_stabilizes() -> None:
    env = gym.make("InvertedDoublePendulum-v5").unwrapped
    a, b = linearize_step(env.model, env.frame_skip)
    assert env.model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    gain = lqr_gain(a, b, np.eye(6), np.eye(1))
    assert np.abs(np.linalg.eigvals(a)).max() > 1.0  # upright is unstable without control
    assert np.abs(np.linalg.eigvals(a - b @ gain)).max() < 1.0


def test_lqr_expert_keeps_pendulum_up_for_full_episodes_under_actuator_noise() -> None:
    config = dataclasses.replace(PENDULUM, horizon=None, eval_action_noise=0.1)
    task = BehaviorCloningTask(config)
    metrics = task.evaluate(task.expert(), "test")
    assert metrics["success_rate"] == 1.0
    assert metrics["episode_length"] == 1000
    assert metrics["return_mean"] > 9.3 * 1000


def test_two_link_ik_reaches_reachable_targets() -> None:
    radius = torch.linspace(0.03, 0.2, 9, dtype=torch.float64)
    angle = torch.linspace(-3.0, 3.0, 9, dtype=torch.float64)
    target = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
    q1, q2 = two_link_ik(target, 0.1, 0.11, 3.0)
    tip = torch.stack(
        (
            0.1 * torch.cos(q1) + 0.11 * torch.cos(q1 + q2),
            0.1 * torch.sin(q1) + 0.11 * torch.sin(q1 + q2),
        ),
        dim=1,
    )
    assert torch.allclose(tip, target, atol=1e-12)
    assert bool((q2 >= 0).all())


def test_reacher_expert_reaches_target_noise_free_and_mostly_under_noise() -> None:
    clean = BehaviorCloningTask(
        dataclasses.replace(REACHER, n_eval_episodes=20, eval_action_noise=0)
    )
    metrics = clean.evaluate(clean.expert(), "val")
    assert metrics["success_rate"] == 1.0
    assert metrics["final_distance"] < 0.2 * REACHER_SUCCESS_DISTANCE
    noisy = BehaviorCloningTask(dataclasses.replace(REACHER, n_eval_episodes=20))
    assert noisy.evaluate(noisy.expert(), "val")["success_rate"] >= 0.9


@pytest.mark.parametrize("config", [PENDULUM, REACHER], ids=["pendulum", "reacher"])
def test_expert_as_policy_scores_what_a_plain_loop_scores(config: ControlConfig) -> None:
    task = BehaviorCloningTask(config)
    expert = task.expert()
    metrics = task.evaluate(expert, "val")
    episodes = [plain_episode(config, expert, s) for s in episode_seeds(0, "val", 8)]
    assert metrics["return_mean"] == pytest.approx(np.mean([e[0] for e in episodes]), rel=1e-9)
    if config.env == "pendulum":
        assert metrics["success_rate"] == 1.0
        assert all(steps == 100 and not fell for _, steps, fell in episodes)


@pytest.mark.parametrize("config", [PENDULUM, REACHER], ids=["pendulum", "reacher"])
def test_zero_policy_gets_the_floor(config: ControlConfig) -> None:
    task = BehaviorCloningTask(config)
    act_dim = task.splits().train.tensors[1].shape[1]
    zero = task.evaluate(Constant(act_dim), "test")
    expert = task.evaluate(task.expert(), "test")
    assert zero["success_rate"] == 0.0
    assert zero["return_mean"] < expert["return_mean"]
    if config.env == "pendulum":
        assert zero["episode_length"] < 50
    else:
        assert zero["final_distance"] > 5 * REACHER_SUCCESS_DISTANCE


class ExpertWhereTargetRight(nn.Module):
    """The Reacher expert on episodes whose target lies at x > 0, zero commands elsewhere."""

    def __init__(self, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        right = (observation[:, 4:5] > 0).to(torch.float64)
        return right * self.expert(observation)


def test_success_rate_counts_the_successful_episodes() -> None:
    config = dataclasses.replace(REACHER, eval_action_noise=0.0)
    task = BehaviorCloningTask(config)
    metrics = task.evaluate(ExpertWhereTargetRight(task.expert()), "test")
    env = gym.make("Reacher-v5")
    targets_x = [env.reset(seed=s)[0][4] for s in episode_seeds(0, "test", 8)]
    assert 0 < np.mean(np.array(targets_x) > 0) < 1
    assert metrics["success_rate"] == np.mean(np.array(targets_x) > 0)


def test_non_finite_actions_end_episodes_as_failures() -> None:
    pendulum = BehaviorCloningTask(PENDULUM).evaluate(Constant(1, float("nan")), "val")
    assert pendulum == {"success_rate": 0.0, "return_mean": 0.0, "episode_length": 0.0}
    reacher = BehaviorCloningTask(REACHER).evaluate(Constant(2, float("nan")), "val")
    assert reacher == {"success_rate": 0.0, "return_mean": 0.0, "final_distance": 0.6}


def test_loss_is_zero_for_the_expert_and_mean_square_for_zeros() -> None:
    task = BehaviorCloningTask(REACHER)
    observations, actions = task.splits().val.tensors
    assert task.loss(task.expert(), (observations, actions)).item() < 1e-10
    zero = task.loss(Constant(2), (observations, actions))
    assert zero.item() == pytest.approx(actions.square().mean().item())


def test_evaluate_is_deterministic_and_restores_training_mode() -> None:
    task = BehaviorCloningTask(REACHER)
    torch.manual_seed(0)
    model = task.make_model()
    assert model(task.splits().train.tensors[0][:4]).shape == (4, 2)
    model.train()
    assert task.evaluate(model, "test") == task.evaluate(model, "test")
    assert model.training


def test_task_protocol_factory_and_config_validation() -> None:
    task = make_control_task("quick", 3, "reacher")
    assert isinstance(task, Task)
    assert task.config == ControlConfig.quick("reacher", seed=3)
    assert task.higher_is_better[task.primary_metric]
    assert ControlConfig.full("pendulum").episode_steps == 1000
    with pytest.raises(ValueError, match="unknown env"):
        ControlConfig(env="humanoid")
    with pytest.raises(ValueError, match="horizon"):
        ControlConfig(env="reacher", horizon=51)
    with pytest.raises(ValueError, match="eval_action_noise"):
        ControlConfig(eval_action_noise=-0.1)
    with pytest.raises(ValueError, match="size"):
        make_control_task("huge", 0, "pendulum")
    with pytest.raises(ValueError, match="shape"):
        LQRExpert(np.zeros((2, 6)))


def test_the_residual_policy_option_builds_trains_and_is_rolled_out() -> None:
    """policy="residual": the residual MLP, standardized inputs, every Linear under AP."""
    from dataclasses import replace

    from beyondloss.optim.factory import make_optimizer
    from beyondloss.tasks.control import ResidualPolicy
    from beyondloss.train import TrainConfig, train

    task = BehaviorCloningTask(replace(PENDULUM, policy="residual", hidden=16, depth=2))
    torch.manual_seed(0)
    model = task.make_model()
    assert isinstance(model, ResidualPolicy) and len(model.blocks) == 2
    optimizer = make_optimizer("dopr-adamw", model, lr=1e-3)
    fates = {f.name: f.preconditioning for f in optimizer.parameter_fates()}
    assert all(fates[f"blocks.{i}.{j}.weight"].startswith("preconditioned (") for i in (0, 1)
               for j in (1, 3))  # fmt: skip
    splits = task.splits()
    history = train(model, optimizer, splits.train, task.loss,
                    TrainConfig(epochs=2, batch_size=64), progress=False)  # fmt: skip
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= task.evaluate(model, "val")["success_rate"] <= 1.0
    with pytest.raises(ValueError, match="unknown policy 'transformer'"):
        ControlConfig(policy="transformer")
