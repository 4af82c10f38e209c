"""SWA and EMA: equal to explicit averages of saved weights; BatchNorm recomputed; rebuildable."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from beyondloss.posthoc.averaging import EMA, SWA


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def _snapshots(model: nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    """Move the weights randomly ``n`` times (as epochs would) and return each state."""
    states = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        states.append(copy.deepcopy(model.state_dict()))
    return states


def test_swa_is_the_uniform_average_of_the_epochs_since_start() -> None:
    model, swa = _mlp(), SWA(start_epoch=3)
    folded = []
    for epoch, state in enumerate(_snapshots(_mlp(), 6), start=1):
        model.load_state_dict(state)
        folded.append(swa.update(model, epoch))
    assert folded == [False, False, True, True, True, True]
    states = _snapshots(_mlp(), 6)[2:]
    for name, value in swa.module.state_dict().items():
        expected = torch.stack([s[name] for s in states]).mean(dim=0)
        torch.testing.assert_close(value, expected)
    assert swa.n_averaged == 4


def test_ema_follows_the_recursion_from_the_first_snapshot() -> None:
    model, ema = _mlp(), EMA(decay=0.7)
    states = _snapshots(_mlp(), 4)
    for epoch, state in enumerate(states, start=1):
        model.load_state_dict(state)
        ema.update(model, epoch)
    for name, value in ema.module.state_dict().items():
        expected = states[0][name]
        for state in states[1:]:
            expected = 0.7 * expected + 0.3 * state[name]
        torch.testing.assert_close(value, expected)


def test_batchnorm_statistics_are_recomputed_for_the_averaged_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = torch.randn(64, 3)
    loader = [(data[i : i + 16], None) for i in range(0, 64, 16)]
    with pytest.raises(ValueError, match="bn_loader"):
        SWA().update(model, 1)
    swa = SWA(bn_loader=loader)
    for epoch in (1, 2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        swa.update(model, epoch)
    averaged = swa.module
    expected = torch.stack([averaged[0](x).mean(dim=0) for x, _ in loader]).mean(dim=0)
    torch.testing.assert_close(averaged[1].running_mean, expected.detach())
    assert not averaged.training


def test_state_dict_rebuilds_the_averaged_model_and_resumes_averaging() -> None:
    states = _snapshots(_mlp(), 3)
    model, swa = _mlp(), SWA()
    for epoch, state in enumerate(states[:2], start=1):
        model.load_state_dict(state)
        swa.update(model, epoch)
    saved = swa.state_dict()
    rebuilt = _mlp()
    rebuilt.load_state_dict(saved["module"])
    x = torch.randn(5, 3)
    torch.testing.assert_close(rebuilt(x), swa.module(x))

    resumed = SWA()
    resumed.load_state_dict(saved, template=_mlp())
    model.load_state_dict(states[2])
    swa.update(model, 3)
    resumed.update(model, 3)
    torch.testing.assert_close(resumed.module(x), swa.module(x))
    assert resumed.n_averaged == 3


def test_empty_average_has_no_module_and_bad_decay_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no snapshot"):
        _ = SWA(start_epoch=5).module
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
