"""Normalized RMSE and valid prediction time on hand-made forecasts with known answers."""

import math

import pytest
import torch

from beyondloss.metrics.rollout import (
    normalized_rmse,
    valid_prediction_time,
    valid_prediction_times,
)


def test_constant_offset_of_half_a_std_in_every_dimension_gives_nrmse_one_half() -> None:
    true = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([2.0, 5.0, 0.5])
    nrmse = normalized_rmse(true + 0.5 * scale, true, scale)
    assert nrmse.shape == (4, 7)
    torch.testing.assert_close(nrmse, torch.full((4, 7), 0.5))


def test_offset_in_one_dimension_is_averaged_over_the_state_dimensions() -> None:
    true = torch.zeros(2, 5, 3)
    scale = torch.tensor([4.0, 1.0, 1.0])
    pred = true.clone()
    pred[..., 0] = 6.0  # 1.5 std in dimension 0 only: sqrt(1.5² / 3)
    torch.testing.assert_close(
        normalized_rmse(pred, true, scale), torch.full((2, 5), 1.5 / math.sqrt(3.0))
    )


def test_perfect_forecast_has_zero_nrmse_and_nonfinite_forecast_is_not_finite() -> None:
    true = torch.randn(3, 4, 2)
    scale = torch.ones(2)
    assert normalized_rmse(true, true, scale).eq(0).all()
    broken = true.clone()
    broken[1, 2, 0] = float("nan")
    broken[2, 3, 1] = float("inf")
    nrmse = normalized_rmse(broken, true, scale)
    assert nrmse[1, 2].isnan() and nrmse[2, 3].isinf()
    assert nrmse.isfinite().sum() == 10


@pytest.mark.parametrize(
    ("pred_shape", "scale"),
    [((2, 4, 3), torch.ones(3)), ((2, 5, 3), torch.ones(2)), ((2, 5, 3), torch.zeros(3))],
)
def test_normalized_rmse_rejects_mismatched_shapes_and_nonpositive_scale(
    pred_shape: tuple[int, ...], scale: torch.Tensor
) -> None:
    with pytest.raises(ValueError):
        normalized_rmse(torch.zeros(pred_shape), torch.zeros(2, 5, 3), scale)


def test_valid_prediction_time_counts_leading_steps_within_threshold() -> None:
    nrmse = torch.tensor(
        [
            [0.1, 0.2, 0.5, 0.1],  # exceeds at step 3: valid for 2 steps
            [0.5, 0.1, 0.1, 0.1],  # exceeds at once: 0
            [0.1, 0.1, 0.1, 0.1],  # never exceeds: the full horizon, 4 steps
            [0.4, 0.4, 0.41, 0.0],  # equal to the threshold is still valid: 2 steps
        ]
    )
    # dt · λ = 0.5 · 2 = 1 Lyapunov time per step
    times = valid_prediction_times(nrmse, dt=0.5, threshold=0.4, lyapunov_exponent=2.0)
    torch.testing.assert_close(times, torch.tensor([2.0, 0.0, 4.0, 2.0], dtype=torch.float64))
    assert valid_prediction_time(nrmse, dt=0.5, threshold=0.4, lyapunov_exponent=2.0) == 2.0


def test_nonfinite_error_ends_the_valid_prediction_time() -> None:
    nrmse = torch.tensor([[0.1, float("nan"), 0.1], [0.1, 0.1, float("inf")]])
    times = valid_prediction_times(nrmse, dt=1.0, threshold=0.4, lyapunov_exponent=1.0)
    torch.testing.assert_close(times, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_default_threshold_and_lorenz_exponent_give_the_full_horizon_in_lyapunov_times() -> None:
    nrmse = torch.full((3, 200), 0.39)
    assert valid_prediction_time(nrmse, dt=0.01) == pytest.approx(200 * 0.01 * 0.906)


@pytest.mark.parametrize(
    ("shape", "dt", "threshold", "exponent"),
    [
        ((5,), 0.1, 0.4, 1.0),
        ((2, 5), 0.0, 0.4, 1.0),
        ((2, 5), 0.1, 0.0, 1.0),
        ((2, 5), 0.1, 0.4, 0.0),
    ],
)
def test_valid_prediction_times_rejects_bad_arguments(
    shape: tuple[int, ...], dt: float, threshold: float, exponent: float
) -> None:
    with pytest.raises(ValueError):
        valid_prediction_times(torch.zeros(shape), dt, threshold, exponent)
