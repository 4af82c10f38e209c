"""Gradient preconditioners the DoPr paper uses as bases besides Adam(W) and Muon: Signum and
AdaMuon. Both are plain ``torch.optim.Optimizer`` subclasses, so DoPr's activation
preconditioner composes with them exactly as with AdamW (``DoPr(model, base="signum")``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton–Schulz coefficients of Muon (Jordan et al., 2024)."""


def newton_schulz(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate orthogonalization ``U Vᵀ`` of ``matrix = U S Vᵀ`` (2-D), in fp32:
    ``X ← X / ‖X‖_F``, then ``steps`` times ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``
    (on the wide orientation, so ``A`` is the smaller Gram matrix)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Signum(Optimizer):
    r"""Signum: SGD on the sign of momentum (Bernstein et al., 2018, "signSGD: Compressed
    Optimisation for Non-Convex Problems", Algorithm 3), with decoupled weight decay.

    .. code-block:: text

        m_t = β m_{t−1} + (1 − β) g_t          (m_0 = 0)
        θ_t = (1 − η λ) θ_{t−1} − η sign(m_t)

    Every coordinate moves by exactly ``η`` (or 0 where ``m_t = 0``), so the update's RMS is
    ``η``, as Adam's is early in training: the same learning rates apply.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1.0 - beta)
                if decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(buffer.sign(), alpha=-lr)
        return loss


class AdaMuon(Optimizer):
    r"""AdaMuon (Si, Zhang & Shen, 2025, "AdaMuon: Adaptive Muon Optimizer", arXiv:2507.11005,
    Algorithm 1 and the authors' reference code) on 2-D weights, with decoupled weight decay.

    .. code-block:: text

        M_t = μ M_{t−1} + (1 − μ) G_t                     (M_0 = 0)
        N_t = μ M_t + (1 − μ) G_t   (Nesterov; N_t = M_t without)
        O_t = NewtonSchulz5(N_t)                          (orthogonalized direction)
        V_t = β₂ V_{t−1} + (1 − β₂) O_t ⊙ O_t            (V_0 = 0)
        Ô_t = O_t / (sqrt(V_t / (1 − β₂ᵗ)) + ε)           (element-wise)
        θ_t = (1 − η λ) θ_{t−1} − η · 0.2 sqrt(m n) · Ô_t / (‖Ô_t‖_F + ε)

    The last factor is the RMS-aligned rescaling: the update of an ``m × n`` weight has RMS
    ``0.2 η``, AdamW's typical RMS, so AdamW's learning rates carry over (as Muon's
    ``adjust_lr_fn="match_rms_adamw"``). ``betas = (μ, β₂)``: its first entry is the momentum,
    so momentum-cycling schedulers reach it as they reach Adam's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-8,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay,
                    "nesterov": nesterov, "ns_steps": ns_steps, "eps": eps}  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"AdaMuon takes 2-D weights only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (mu, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["v_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1.0 - mu)
                direction = p.grad.lerp(buffer, mu) if group["nesterov"] else buffer
                ortho = newton_schulz(direction, group["ns_steps"])
                v = state["v_buffer"]
                v.mul_(beta2).addcmul_(ortho, ortho, value=1.0 - beta2)
                scaled = ortho / ((v / (1.0 - beta2 ** state["step"])).sqrt() + eps)
                rms = 0.2 * (p.shape[0] * p.shape[1]) ** 0.5 / (scaled.norm() + eps)
                if decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(scaled.to(p.dtype), alpha=-lr * float(rms))
        return loss
