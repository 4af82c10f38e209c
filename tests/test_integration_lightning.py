"""DoPr inside PyTorch Lightning: the recipe of docs/integrations.md, trained for real.

A two-layer MLP regresses a fixed random nonlinear map on CPU; 3 batches make an epoch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from beyondloss.integrations.lightning import configure_dopr  # noqa: E402
from beyondloss.optim import DoPr  # noqa: E402

WARMUP = 3


def data(batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=g) * torch.linspace(0.2, 3.0, 8)  # anisotropic inputs
    y = torch.tanh(x @ torch.randn(8, 2, generator=g)) + 0.5 * x[:, :2]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


class Regressor(pl.LightningModule):
    """The documented recipe: ``configure_optimizers`` returns DoPr over ``self``."""

    def __init__(self, optimizer: str = "dopr", **dopr_kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
        self.optimizer_name = optimizer
        self.dopr_kwargs = dopr_kwargs
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.clipped: list[tuple[float, int]] = []  # (grad norm after clipping, AP steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, **kwargs):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, **kwargs)
        if gradient_clip_val:
            norm = torch.stack([p.grad.norm() for p in self.parameters()]).norm().item()
            self.clipped.append((norm, optimizer.preconditioner.steps))

    def configure_optimizers(self):
        def warmup(step: int) -> float:
            return min(1.0, (step + 1) / WARMUP)

        if self.optimizer_name == "torch_adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=3e-2, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"},
            }
        return configure_dopr(
            self,
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup),
            lr=3e-2,
            **self.dopr_kwargs,
        )


def trainer(**overrides) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 10,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **overrides,
    }
    return pl.Trainer(**settings)


def parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs():
    """The same 30 steps three ways: DoPr, DoPr with AP off, and torch's AdamW."""
    results = {}
    for name, module in {
        "dopr": Regressor(),
        "ap_off": Regressor(activation_preconditioning=False),
        "torch_adamw": Regressor("torch_adamw"),
    }.items():
        fit = trainer()
        fit.fit(module, data())
        results[name] = (fit, module)
    return results


def test_configure_optimizers_returning_dopr_trains_through_the_closure(runs):
    fit, module = runs["dopr"]
    assert fit.global_step == 30
    first, last = sum(module.losses[:3]) / 3, sum(module.losses[-3:]) / 3
    assert last < 0.5 * first
    dopr = fit.optimizers[0]
    assert isinstance(dopr, DoPr)
    assert set(dopr.preconditioner.layers) == {"net.0", "net.2"}
    assert dopr.describe().count("preconditioned (") == 2
    # Lightning stepped DoPr with its closure once per batch; AP ran on every step.
    assert dopr.preconditioner.steps == 30
    # The scheduler is per-step and drives DoPr's param_groups.
    assert module.lrs[:4] == pytest.approx([1e-2, 2e-2, 3e-2, 3e-2])


def test_ap_off_is_torch_adamw_and_ap_changes_the_update(runs):
    dopr, ap_off, adamw = (parameters(runs[name][1]) for name in ("dopr", "ap_off", "torch_adamw"))
    assert max_difference(ap_off, adamw) < 1e-6
    assert max_difference(dopr, adamw) > 1e-2


def test_gradient_clipping_acts_on_the_raw_gradient_before_dopr():
    module = Regressor()
    trainer(max_epochs=2, gradient_clip_val=0.01).fit(module, data())
    assert len(module.clipped) == 6
    for step, (norm, ap_steps) in enumerate(module.clipped):
        assert norm == pytest.approx(0.01, rel=1e-4)
        assert ap_steps == step  # clipped inside the closure, before DoPr preconditions


def test_gradient_accumulation_pools_the_micro_batches_into_one_dopr_step():
    dopr_kwargs = {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}
    whole, accumulated = Regressor(**dopr_kwargs), Regressor(**dopr_kwargs)
    trainer(max_epochs=3).fit(whole, data(16))
    fit = trainer(max_epochs=3, accumulate_grad_batches=2)
    fit.fit(accumulated, data(8))
    assert fit.global_step == 9
    assert fit.optimizers[0].preconditioner.steps == 9
    assert max_difference(parameters(whole), parameters(accumulated)) < 1e-4


def test_model_checkpoint_resume_restores_dopr_exactly(tmp_path):
    dopr_kwargs = {"cov_every": 2, "inverse_every": 2}
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    uninterrupted = Regressor(**dopr_kwargs)
    trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        uninterrupted, data()
    )
    assert (tmp_path / "epoch=0.ckpt").is_file()

    resumed = Regressor(**dopr_kwargs)
    fit = trainer(max_epochs=2)
    with warnings.catch_warnings():
        # A DoPr that lost its statistics warns that layers got gradients without inputs.
        warnings.filterwarnings("error", message=".*without recorded inputs")
        fit.fit(resumed, data(), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert fit.global_step == 6
    assert fit.optimizers[0].preconditioner.steps == 6
    assert max_difference(parameters(resumed), parameters(uninterrupted)) == 0.0


def test_configure_dopr_without_scheduler_returns_the_optimizer():
    module = nn.Sequential(nn.Linear(4, 4))
    assert isinstance(configure_dopr(module, lr=1e-3), DoPr)
    with pytest.raises(ValueError, match="interval"):
        configure_dopr(module, lambda opt: None, interval="batch")
