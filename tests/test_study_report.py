"""The study's per-epoch curve plot."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.axes import Axes

from beyondloss.study.report import Summary, plot_curves


def test_curve_band_spans_the_seeds_and_stays_inside_the_metrics_range(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Success rates of three seeds: mean ± std would dip below 0 at epoch 2 (0, 0, 0.9).
    seeds = [
        {"epoch": [1.0, 2.0, 3.0], "val_loss": [1e-2, 1e-3, 1e-4], "success": [0.0, 0.0, 1.0]},
        {"epoch": [1.0, 2.0, 3.0], "val_loss": [2e-2, 2e-3, 2e-4], "success": [0.0, 0.0, 1.0]},
        {"epoch": [1.0, 2.0, 3.0], "val_loss": [3e-2, 3e-3, 3e-4], "success": [0.0, 0.9, 1.0]},
    ]
    bands: list[tuple[np.ndarray, np.ndarray]] = []
    fill_between = Axes.fill_between

    def recording(self, x, low, high, *args, **kwargs):
        bands.append((np.asarray(low), np.asarray(high)))
        return fill_between(self, x, low, high, *args, **kwargs)

    monkeypatch.setattr(Axes, "fill_between", recording)
    summary = Summary(optimizer="adamw", lr=1e-3, n=3, mean={}, std={})
    path = tmp_path / "curves.png"
    panels = [("val_loss", True), ("success", False)]
    plot_curves(path, lambda _: seeds, {"adamw": summary}, panels, "band test")

    assert path.stat().st_size > 0
    (loss_low, loss_high), (rate_low, rate_high) = bands
    np.testing.assert_allclose(loss_low, [1e-2, 1e-3, 1e-4])
    np.testing.assert_allclose(loss_high, [3e-2, 3e-3, 3e-4])
    np.testing.assert_allclose(rate_low, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(rate_high, [0.0, 0.9, 1.0])
