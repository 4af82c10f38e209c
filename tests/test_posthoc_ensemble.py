"""Ensembles and compositions: combination rules and the SWA → TS → Ens → TS order."""

from __future__ import annotations

import pytest
import torch

from beyondloss.posthoc.ensemble import Composition, ensemble_logits, standard_compositions
from beyondloss.posthoc.temperature import TemperatureScaling


def _members(m: int = 3, n: int = 300, c: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 4.0])[:m, None, None]
    val = scale * torch.randn(m, n, c, generator=generator)
    test = scale * torch.randn(m, n, c, generator=generator)
    labels = torch.randint(0, c, (n,), generator=generator)
    return val, labels, test


def test_mean_of_logits_and_log_of_mean_probabilities() -> None:
    z = torch.tensor([[[0.0, 2.0]], [[1.0, -1.0]]])
    torch.testing.assert_close(ensemble_logits(z), torch.tensor([[0.5, 0.5]]))
    mean_probs = (torch.softmax(z[0], 1) + torch.softmax(z[1], 1)) / 2
    combined = ensemble_logits(z, combine="probs")
    torch.testing.assert_close(torch.softmax(combined, 1), mean_probs)
    torch.testing.assert_close(combined.exp().sum(1), torch.ones(1))
    assert ensemble_logits(z.half()).dtype == torch.float32


def test_swa_ens_ts_is_ts_per_member_then_mean_then_ts_again() -> None:
    val, labels, test = _members()
    scalers = [TemperatureScaling().fit(v, labels) for v in val]
    val_mean = torch.stack([v / s.temperature for v, s in zip(val, scalers, strict=True)]).mean(0)
    test_mean = torch.stack([t / s.temperature for t, s in zip(test, scalers, strict=True)]).mean(0)
    final = TemperatureScaling().fit(val_mean, labels).temperature

    composition = Composition("swa", ensemble=True, final_ts=True)
    out_val, out_test = composition.apply(val, labels, test)
    assert composition.name == "SWA+Ens+TS"
    torch.testing.assert_close(out_val, val_mean / final)
    torch.testing.assert_close(out_test, test_mean / final)


def test_raw_ensemble_and_single_model_ts() -> None:
    val, labels, test = _members()
    _, raw_test = Composition(ensemble=True, member_ts=False).apply(val, labels, test)
    torch.testing.assert_close(raw_test, test.mean(0))
    t = TemperatureScaling().fit(val[1], labels).temperature
    _, single = Composition(final_ts=True).apply(val[1], labels, test[1])
    torch.testing.assert_close(single, test[1] / t)
    with pytest.raises(ValueError, match="3-d"):
        Composition(ensemble=True).apply(val[0], labels, test[0])


def test_names_of_the_standard_compositions() -> None:
    single = [c.name for c in standard_compositions(ensemble=False)]
    assert single == ["base", "TS", "SWA", "SWA+TS"]
    names = [c.name for c in standard_compositions(("base", "swa", "ema0.9"))]
    assert names == [
        "base", "TS", "Ens", "Ens+TS",
        "SWA", "SWA+TS", "SWA+Ens", "SWA+Ens+TS",
        "EMA0.9", "EMA0.9+TS", "EMA0.9+Ens", "EMA0.9+Ens+TS",
    ]  # fmt: skip
    assert Composition(ensemble=True, member_ts=False, combine="probs").name == "Ens-raw-probs"
