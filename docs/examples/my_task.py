"""An outside task for beyondloss: forecast a damped pendulum one step ahead, deploy by rollout.

The model is trained on one-step pairs (state -> next state) and judged by what it does when
deployed: fed its own predictions for 100 steps, how many it stays within tolerance of the truth.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from beyondloss.tasks import Splits


def simulate(trajectories: int, steps: int, seed: int) -> torch.Tensor:
    """``(trajectories, steps + 1, 2)`` states (angle, velocity) from random starts."""
    state = torch.randn(trajectories, 2, generator=torch.Generator().manual_seed(seed))
    states = [state]
    for _ in range(steps):
        velocity = state[:, 1] + 0.05 * (-torch.sin(state[:, 0]) - 0.1 * state[:, 1])
        state = torch.stack([state[:, 0] + 0.05 * velocity, velocity], dim=1)
        states.append(state)
    return torch.stack(states, dim=1)


def pairs(trajectories: torch.Tensor) -> TensorDataset:
    """One-step training pairs ``(state, next state)``; a batch collates to ``(x, y)``."""
    return TensorDataset(trajectories[:, :-1].reshape(-1, 2), trajectories[:, 1:].reshape(-1, 2))


class PendulumForecast:
    name = "pendulum-forecast"
    primary_metric = "steps_in_tolerance"
    higher_is_better = {"steps_in_tolerance": True, "rollout_mse": False}

    def __init__(self, size: str, data_seed: int) -> None:
        self.epochs = 4 if size == "quick" else 20
        self.batch_size = 64
        self.horizon = 100
        self.tolerance = 0.01
        self.data_seed = data_seed
        self.trajectories = {
            "train": simulate(64, 50, data_seed),
            "val": simulate(16, self.horizon, data_seed + 1),
            "test": simulate(16, self.horizon, data_seed + 2),
        }

    def splits(self) -> Splits:
        return Splits(*(pairs(self.trajectories[split]) for split in ("train", "val", "test")))

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return (x + model(x) - y).square().mean()  # the model predicts the increment

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", primary_only: bool = False) -> dict:
        truth = self.trajectories[split]
        state, errors = truth[:, 0], []
        for step in range(1, truth.shape[1]):
            state = state + model(state)  # fed its own prediction
            errors.append((state - truth[:, step]).square().sum(dim=1))
        errors = torch.stack(errors, dim=1)
        within = (errors < self.tolerance).int().cumprod(dim=1).sum(dim=1).float()
        return {"steps_in_tolerance": within.mean().item(), "rollout_mse": errors.mean().item()}


def make_task(size: str, data_seed: int) -> PendulumForecast:
    """The factory beyondloss calls: ``(size, data_seed) -> Task``."""
    return PendulumForecast(size, data_seed)
