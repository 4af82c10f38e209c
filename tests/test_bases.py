"""Signum and AdaMuon, each against a direct implementation of its formula, and as DoPr bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from beyondloss.optim.bases import AdaMuon, Signum, newton_schulz
from beyondloss.optim.dopr import DoPr
from beyondloss.optim.factory import make_optimizer


def _gradients(shape: tuple[int, ...], steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def _run(
    optimizer_class: type, start: torch.Tensor, grads: list[torch.Tensor], **kw: object
) -> torch.Tensor:
    p = nn.Parameter(start.clone())
    optimizer = optimizer_class([p], **kw)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach()


def test_signum_is_the_sign_of_momentum_with_decoupled_decay() -> None:
    start = torch.randn(4, 3, dtype=torch.float64)
    grads = _gradients((4, 3), 6)
    lr, beta, decay = 0.01, 0.8, 0.1
    theta, m = start.clone(), torch.zeros_like(start)
    for g in grads:
        m = beta * m + (1 - beta) * g
        theta = (1 - lr * decay) * theta - lr * torch.sign(m)
    got = _run(Signum, start, grads, lr=lr, momentum=beta, weight_decay=decay)
    torch.testing.assert_close(got, theta)


def _orthogonalize(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton–Schulz written out on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = x if x.shape[0] <= x.shape[1] else x.T
    y = wide / (wide.norm() + 1e-7)
    for _ in range(steps):
        y = a * y + b * (y @ y.T) @ y + c * (y @ y.T) @ (y @ y.T) @ y
    return y if x.shape[0] <= x.shape[1] else y.T


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_adamuon_follows_its_algorithm(shape: tuple[int, int]) -> None:
    start = torch.randn(shape, dtype=torch.float64)
    grads = _gradients(shape, 5)
    lr, mu, beta2, decay, eps = 0.02, 0.9, 0.99, 0.1, 1e-8
    theta, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for t, g in enumerate(grads, start=1):
        m = mu * m + (1 - mu) * g
        o = _orthogonalize(mu * m + (1 - mu) * g).double()
        v = beta2 * v + (1 - beta2) * o * o
        o_hat = o / (torch.sqrt(v / (1 - beta2**t)) + eps)
        scale = 0.2 * (shape[0] * shape[1]) ** 0.5 / (o_hat.norm() + eps)
        theta = (1 - lr * decay) * theta - lr * scale * o_hat
    got = _run(AdaMuon, start, grads, lr=lr, betas=(mu, beta2), weight_decay=decay)
    # Newton–Schulz runs in fp32 inside the optimizer.
    torch.testing.assert_close(got, theta, rtol=1e-4, atol=1e-5)


def test_newton_schulz_nearly_orthogonalizes() -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    singular_values = torch.linalg.svdvals(newton_schulz(x))
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25  # Muon's NS band


def test_adamuon_update_has_the_rms_of_adamw() -> None:
    p = nn.Parameter(torch.zeros(16, 8))
    p.grad = torch.randn(16, 8)
    AdaMuon([p], lr=1.0).step()
    assert p.detach().square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-4)
    with pytest.raises(ValueError, match="2-D weights only"):
        AdaMuon([nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("name", ["signum", "dopr-signum", "adamuon", "dopr-adamuon"])
def test_the_new_bases_train_as_dopr_bases(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))  # fmt: skip
    optimizer = make_optimizer(name, model, lr=1e-2, weight_decay=1e-4)
    x = torch.randn(128, 3)
    y = x.sin().sum(1, keepdim=True)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    kinds = {type(opt).__name__ for opt in optimizer.base_optimizers}
    assert kinds == ({"Signum"} if "signum" in name else {"AdaMuon", "AdamW"})
    state = optimizer.state_dict()
    fresh = make_optimizer(name, model, lr=3e-3, weight_decay=1e-4)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["param_groups"] == state["param_groups"]


def test_adamuon_splits_like_muon_and_takes_new_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = DoPr(model, base="adamuon", lr=1e-3)
    adamuon, adamw = optimizer.base_optimizers
    assert [p.shape for g in adamuon.param_groups for p in g["params"]] == [torch.Size([8, 3])]
    head = nn.Linear(2, 2)
    model.add_module("extra", head)
    optimizer.add_param_group({"params": list(head.parameters())})
    assert sum(len(g["params"]) for g in adamw.param_groups) == 5
