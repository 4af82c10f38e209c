"""Temperature scaling (Guo et al., 2017): one scalar ``T > 0`` that divides the logits.

Given held-out logits ``z`` of shape ``(N, C)`` and labels ``y`` of shape ``(N,)``,

    T* = argmin_T  (1/N) Σ_i [ logsumexp_c(z_ic / T) − z_{i,y_i} / T ].

The objective is convex in ``β = 1/T`` (a log-sum-exp of linear functions minus a linear
function), hence unimodal in ``log T``; a bounded Brent search on ``log T`` therefore finds the
global minimum inside the bounds, deterministically and without a learning rate. The argmax of
the logits, hence the error, never changes.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor, nn


class TemperatureScaling:
    """Fit ``T`` by NLL on held-out logits, then map logits ``z ↦ z / T``.

    Parameters
    ----------
    t_min, t_max:
        Search interval of the temperature (dimensionless, ``0 < t_min < t_max``). The optimum
        of perfectly separable data is ``T → 0``; the bound keeps it finite.
    tol:
        Absolute tolerance of the search on ``log T`` (relative tolerance on ``T``).

    Example
    -------
    >>> ts = TemperatureScaling().fit(val_logits, val_labels)
    >>> calibrated_test_logits = ts(test_logits)
    """

    def __init__(self, t_min: float = 1e-2, t_max: float = 1e2, tol: float = 1e-6) -> None:
        if not 0.0 < t_min < t_max or not math.isfinite(t_max):
            raise ValueError(f"need 0 < t_min < t_max < inf, got t_min={t_min}, t_max={t_max}")
        if not tol > 0.0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.t_min = t_min
        self.t_max = t_max
        self.tol = tol
        self._temperature: float | None = None

    @property
    def temperature(self) -> float:
        """The fitted temperature ``T`` (dimensionless); raises before :meth:`fit`."""
        if self._temperature is None:
            raise RuntimeError("TemperatureScaling is not fitted; call fit(logits, labels) first")
        return self._temperature

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        """Fit ``T`` on logits ``(N, C)`` and integer labels ``(N,)``; returns ``self``."""
        if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
            raise ValueError(
                f"need logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        z = logits.detach().to("cpu", torch.float64)
        z_label = z.gather(1, labels.detach().to("cpu", torch.long).unsqueeze(1)).squeeze(1)

        def mean_nll(log_t: float) -> float:
            beta = math.exp(-log_t)
            return (torch.logsumexp(z * beta, dim=1) - z_label * beta).mean().item()

        result = minimize_scalar(
            mean_nll,
            bounds=(math.log(self.t_min), math.log(self.t_max)),
            method="bounded",
            options={"xatol": self.tol},
        )
        self._temperature = math.exp(result.x)
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """Scaled logits ``logits / T``, same shape, dtype and device as ``logits``."""
        return logits / self.temperature

    def __repr__(self) -> str:
        fitted = "unfitted" if self._temperature is None else f"T={self._temperature:.4g}"
        return f"TemperatureScaling({fitted})"


class TemperatureScaled(nn.Module):
    """``model`` deployed with its logits divided by a fitted temperature ``T``.

    ``forward(*args) = model(*args) / T``: the argmax, hence every decision a classifier or a
    greedy token model makes, is unchanged; only probability metrics (NLL, ECE, Brier) move.
    ``T`` is a buffer, so :meth:`state_dict` carries it with the model's weights and a module
    built with any placeholder temperature loads it back exactly.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        logits = self.model(*args, **kwargs)
        return logits / self.temperature.to(logits.dtype)
