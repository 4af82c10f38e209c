"""Rollout metrics for forecasts of chaotic systems: normalized error and valid prediction time.

Conventions (shared by every function here): a forecast is a tensor of shape ``(n, T, d)`` —
``n`` trajectories, ``T`` predicted steps, ``d`` state dimensions — where step ``k``
(``k = 0 .. T-1``) lies ``(k + 1)·dt`` time units after the initial condition. The initial
condition itself is not part of the forecast.
"""

from __future__ import annotations

import torch


def normalized_rmse(pred: torch.Tensor, true: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-trajectory normalized root-mean-square error at every forecast step.

    .. math::

        \\mathrm{NRMSE}_i(t) = \\sqrt{\\frac{1}{d}\\sum_{j=1}^{d}
            \\Big(\\frac{\\hat x_{ij}(t) - x_{ij}(t)}{\\sigma_j}\\Big)^2}

    where :math:`\\sigma_j` is the attractor's standard deviation of state dimension ``j``.
    An NRMSE of 0 is a perfect forecast; two independent points of the attractor are about
    :math:`\\sqrt{2}` apart. Average over trajectories (dimension 0) to report one curve.

    Parameters
    ----------
    pred, true:
        Forecast and reference, shape ``(..., T, d)`` (typically ``(n, T, d)``), same units.
    scale:
        :math:`\\sigma`, shape ``(d,)``, in the units of ``pred``; every entry positive.

    Returns
    -------
    torch.Tensor
        Shape ``(..., T)``, dimensionless. Non-finite forecasts give ``nan`` or ``inf``.
    """
    if pred.shape != true.shape:
        raise ValueError(
            f"pred and true must have the same shape, got {pred.shape} and {true.shape}"
        )
    if pred.dim() < 2:
        raise ValueError(f"pred must have shape (..., T, d), got {tuple(pred.shape)}")
    if scale.shape != pred.shape[-1:]:
        raise ValueError(f"scale must have shape ({pred.shape[-1]},), got {tuple(scale.shape)}")
    if not bool((scale > 0).all()):
        raise ValueError("every entry of scale must be positive")
    scaled_error = (pred - true) / scale.to(device=pred.device, dtype=pred.dtype)
    return scaled_error.square().mean(dim=-1).sqrt()


def valid_prediction_times(
    nrmse_per_traj: torch.Tensor,
    dt: float,
    threshold: float = 0.4,
    lyapunov_exponent: float = 0.906,
) -> torch.Tensor:
    """Valid prediction time of every trajectory, in Lyapunov times.

    The forecast of trajectory ``i`` is valid while its NRMSE stays at or below ``threshold``;
    with :math:`K_i` the number of leading steps for which it does,

    .. math::

        \\mathrm{VPT}_i = \\lambda_{\\max}\\, K_i\\, \\Delta t ,

    i.e. the time of the last valid step (0 when the first step already exceeds the threshold,
    the full horizon :math:`\\lambda_{\\max} T \\Delta t` when no step does), measured in
    Lyapunov times :math:`1/\\lambda_{\\max}`. A ``nan`` error counts as exceeding the threshold,
    so a diverging rollout is valid only up to its last finite, accurate step.

    Parameters
    ----------
    nrmse_per_traj:
        Shape ``(n, T)``: NRMSE of each trajectory at steps ``1 .. T`` (see
        :func:`normalized_rmse`).
    dt:
        Time between forecast steps, in the system's time units.
    threshold:
        NRMSE above which the forecast is no longer valid (dimensionless).
    lyapunov_exponent:
        Largest Lyapunov exponent :math:`\\lambda_{\\max}`, per time unit (0.906 for Lorenz-63
        with σ=10, ρ=28, β=8/3).

    Returns
    -------
    torch.Tensor
        Shape ``(n,)``, float64, in Lyapunov times.
    """
    if nrmse_per_traj.dim() != 2:
        raise ValueError(
            f"nrmse_per_traj must have shape (n, T), got {tuple(nrmse_per_traj.shape)}"
        )
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if lyapunov_exponent <= 0:
        raise ValueError(f"lyapunov_exponent must be positive, got {lyapunov_exponent}")
    within = nrmse_per_traj <= threshold  # nan compares False: a diverged step is invalid
    leading_valid_steps = torch.cumprod(within.to(torch.int64), dim=1).sum(dim=1)
    return leading_valid_steps.to(torch.float64) * (dt * lyapunov_exponent)


def valid_prediction_time(
    nrmse_per_traj: torch.Tensor,
    dt: float,
    threshold: float = 0.4,
    lyapunov_exponent: float = 0.906,
) -> float:
    """Mean over trajectories of :func:`valid_prediction_times` (Lyapunov times).

    ``nrmse_per_traj`` has shape ``(n, T)``; the arguments are those of
    :func:`valid_prediction_times`.
    """
    return float(valid_prediction_times(nrmse_per_traj, dt, threshold, lyapunov_exponent).mean())
