"""Temperature scaling: recovers a known temperature, keeps the argmax, is deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from beyondloss.metrics.classification import error_rate, nll
from beyondloss.posthoc.temperature import TemperatureScaled, TemperatureScaling


def _synthetic(t_true: float, n: int = 20000, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports z · t_true, so T* = t_true."""
    generator = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(n, c, generator=generator)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=generator).squeeze(1)
    return z * t_true, labels


@pytest.mark.parametrize("t_true", [0.5, 1.0, 3.0])
def test_fit_recovers_the_known_temperature(t_true: float) -> None:
    logits, labels = _synthetic(t_true)
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.temperature == pytest.approx(t_true, rel=0.05)
    assert nll(ts(logits), labels) <= nll(logits, labels) + 1e-9


def test_scaling_keeps_the_error_and_fits_deterministically() -> None:
    logits, labels = _synthetic(2.0, n=2000)
    first = TemperatureScaling().fit(logits, labels)
    second = TemperatureScaling().fit(logits.half(), labels)
    assert first.temperature == TemperatureScaling().fit(logits, labels).temperature
    assert second.temperature == pytest.approx(first.temperature, rel=1e-2)
    assert error_rate(first(logits), labels) == error_rate(logits, labels)
    assert torch.allclose(first(logits), logits / first.temperature)


def test_separable_data_stops_at_the_lower_bound() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ts = TemperatureScaling(t_min=0.05).fit(logits, torch.tensor([0, 1]))
    assert ts.temperature == pytest.approx(0.05, rel=1e-3)


def test_unfitted_use_and_bad_bounds_are_refused() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling()(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="t_min"):
        TemperatureScaling(t_min=2.0, t_max=1.0)


def test_temperature_scaled_module_divides_logits_and_round_trips_its_temperature() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    inputs = torch.randn(20, 5)
    scaled = TemperatureScaled(model, 2.5)
    assert torch.equal(scaled(inputs), model(inputs) / torch.tensor(2.5).float())
    assert torch.equal(scaled(inputs).argmax(1), model(inputs).argmax(1))
    again = TemperatureScaled(torch.nn.Linear(5, 3))
    again.load_state_dict(scaled.state_dict())
    assert again.temperature.item() == 2.5 and torch.equal(again(inputs), scaled(inputs))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            TemperatureScaled(model, bad)
