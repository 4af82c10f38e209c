"""DoPr behaves like a torch optimizer in ordinary PyTorch code, or fails with a clear error."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beyondloss.optim import ActivationPreconditioner, APConfig, DoPr

GAMMA = 1e-2


def dense_reference(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """G (Σ + λI)⁻¹ in float64, λ = γ tr(Σ)/d, from explicit rows (n, d) and G (d_out, d)."""
    rows = rows.double()
    sigma = rows.T @ rows / rows.shape[0]
    lam = GAMMA * torch.trace(sigma) / sigma.shape[0]
    return grad.double() @ torch.linalg.inv(sigma + lam * torch.eye(sigma.shape[0]).double())


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)


def recording_hooks(module: nn.Module) -> int:
    return len(module._forward_pre_hooks)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


# 1. AP never switches itself off -------------------------------------------------------------


def test_a_step_before_any_forward_does_not_disable_the_layer() -> None:
    layer = nn.Linear(4, 3)
    ap = ActivationPreconditioner(layer, damping=GAMMA, cov_every=10)
    layer.weight.grad = torch.ones_like(layer.weight)  # e.g. a dry-run step with zero grads
    layer.bias.grad = torch.ones_like(layer.bias)
    with pytest.warns(UserWarning, match="without recorded inputs"):
        ap.precondition()
    x = torch.randn(16, 4)
    layer.zero_grad()
    layer(x).sin().sum().backward()  # step 1: not a collection step of the schedule
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    ap.precondition()
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(got.double(), dense_reference(g, with_ones(x)), rtol=1e-4, atol=1e-6)


def test_training_in_eval_mode_is_preconditioned() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    ap = ActivationPreconditioner(model, damping=GAMMA)
    x = torch.randn(16, 4)
    model(x).sin().sum().backward()
    g = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
    ap.precondition()
    got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
    torch.testing.assert_close(got.double(), dense_reference(g, with_ones(x)), rtol=1e-4, atol=1e-6)


def test_a_head_first_used_late_collects_at_its_first_backpropagated_step() -> None:
    torch.manual_seed(0)
    body, head = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.ModuleDict({"body": body, "head": head})
    ap = ActivationPreconditioner(model, damping=GAMMA, cov_every=10)
    for _ in range(3):
        body(torch.randn(8, 4)).sum().backward()
        ap.precondition()
    model.zero_grad()
    x = torch.randn(8, 4)
    hidden = body(x)
    head(hidden).sin().sum().backward()  # step 3
    g = torch.cat([head.weight.grad, head.bias.grad[:, None]], dim=1)
    ap.precondition()
    got = torch.cat([head.weight.grad, head.bias.grad[:, None]], dim=1)
    want = dense_reference(g, with_ones(hidden.detach()))
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)
    assert ap.layers["head"].sigma is not None and not ap.excluded


# 2. copies -------------------------------------------------------------------------------------


def test_forwards_of_a_deepcopied_model_are_not_recorded() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DoPr(model, lr=1e-2)
    ema = copy.deepcopy(model)
    ema(torch.randn(32, 4)).sum().backward()
    assert all(state.n == 0 for state in opt.preconditioner.layers.values())
    model(torch.randn(5, 4)).sum()
    assert opt.preconditioner.layers["0"].n == 5


def test_dopr_deepcopies_and_pickles_with_its_preconditioner(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DoPr(model, lr=1e-2)
    x = torch.randn(16, 4)
    train_steps(model, opt, x, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.preconditioner is not None
        torch.testing.assert_close(
            clone.preconditioner.layers["0"].sigma, opt.preconditioner.layers["0"].sigma
        )
        clone_model = clone.model
        assert clone_model is not model
        train_steps(clone_model, clone, x, 1)  # the copy records its own model
        assert clone.preconditioner.steps == 3
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.preconditioner.steps == opt.preconditioner.steps


def test_dopr_pickles_and_copies_with_an_lr_scheduler_attached() -> None:
    """A scheduler wraps ``opt.step`` in a closure over the optimizer: a copy must drop it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DoPr(model, lr=1e-2)
    opt.register_step_post_hook(lambda *_: None)  # a hook torch itself drops on pickling
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    x = torch.randn(16, 4)
    train_steps(model, opt, x, 2)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt)), loaded):
        before = [p.detach().clone() for p in model.parameters()]
        scheduler = torch.optim.lr_scheduler.LambdaLR(clone, lambda step: 0.5)
        train_steps(clone.model, clone, x, 1)  # steps the copy, not the original
        scheduler.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert clone.preconditioner.steps == 3
        assert clone.param_groups[0]["lr"] == pytest.approx(5e-3)


# 3. torch.compile ---------------------------------------------------------------------------


def test_compiled_model_does_not_recompile_per_step_and_matches_eager() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    opt = DoPr(model, lr=1e-2, cov_every=5, inverse_every=5)
    opt_eager = DoPr(eager, lr=1e-2, cov_every=5, inverse_every=5)
    x = torch.randn(32, 8)
    train_steps(compiled, opt, x, 25)
    train_steps(eager, opt_eager, x, 25)
    assert counter.frame_count <= 3  # recording on / off (and the first step), not per step
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled_first", ["the same model", "another instance"])
def test_models_compiled_before_dopr_was_built_still_record(compiled_first: str) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(32, 8)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    model = mlp()
    compiled = torch.compile(model, backend=counter)
    warm = compiled if compiled_first == "the same model" else torch.compile(mlp(), backend=counter)
    warm(x).sum().backward()  # a graph without DoPr's hooks exists in dynamo's cache
    model.zero_grad()
    opt = DoPr(model, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "received a gradient without recorded inputs"
        train_steps(compiled, opt, x, 3)
    assert all(state.sigma is not None for state in opt.preconditioner.layers.values())
    torch._dynamo.reset()


# 4. LR schedulers with momentum cycling -----------------------------------------------------


@pytest.mark.parametrize("base", ["adamw", "sgd", "muon"])
@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_momentum_cycling_schedulers_work_with_defaults(base: str, scheduler: str) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, base=base, lr=1e-2)
    if scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
    train_steps(model, opt, x, 1)  # the step that uses the scheduled momentum
    if base == "muon":
        muon, adamw = opt.base_optimizers
        assert muon.param_groups[0]["momentum"] == muon.param_groups[0]["betas"][0]
        assert muon.param_groups[0]["momentum"] == adamw.param_groups[0]["betas"][0]
        assert muon.param_groups[0]["momentum"] != 0.95  # cycled, not Muon's default


# 5. torch-standard state ----------------------------------------------------------------------


def test_state_dict_is_torch_standard_and_round_trips_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, base="muon", lr=1e-2)
    x = torch.randn(16, 4)
    train_steps(model, opt, x, 3)
    state = opt.state_dict()
    assert {"state", "param_groups"} <= set(state)
    assert sorted(i for g in state["param_groups"] for i in g["params"]) == list(range(6))
    assert set(state["state"]) == set(range(6))
    twin_model = copy.deepcopy(model)
    twin = DoPr(twin_model, base="muon", lr=1e-2)
    twin.load_state_dict(copy.deepcopy(state))
    train_steps(model, opt, x, 2)
    train_steps(twin_model, twin, x, 2)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_reading_state_of_any_parameter_is_safe_with_two_bases() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, base="muon", lr=1e-2)
    train_steps(model, opt, torch.randn(8, 4), 1)
    head_bias = model[4].bias  # AdamW-owned
    assert "exp_avg" in opt.state[head_bias]
    assert "momentum_buffer" in opt.state[model[2].weight]  # Muon-owned
    muon, adamw = opt.base_optimizers
    assert head_bias not in muon.state
    opt.state_dict()  # no KeyError


@pytest.mark.parametrize("base", ["adamw", "sgd", "muon"])
def test_add_param_group_trains_and_preconditions_a_new_head(base: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    opt = DoPr(model, base=base, lr=1e-2)
    model.append(nn.Tanh())
    model.append(nn.Linear(8, 2))
    opt.add_param_group({"params": model[4].parameters(), "lr": 1e-3})
    assert "4" in opt.preconditioner.layers
    before = model[4].weight.detach().clone()
    train_steps(model, opt, torch.randn(8, 4), 2)
    assert not torch.equal(before, model[4].weight)
    assert opt.param_groups[-1]["lr"] == 1e-3
    assert len(opt.state_dict()["state"]) == 6


# 6. freezing after construction --------------------------------------------------------------


def test_bias_frozen_after_construction_stays_put_and_weight_uses_its_own_sigma() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    opt = DoPr(layer, base="sgd", lr=0.1, momentum=0.0, damping=GAMMA)
    layer.bias.requires_grad_(False)
    bias = layer.bias.detach().clone()
    weight = layer.weight.detach().clone()
    x = torch.randn(16, 4)
    opt.zero_grad()
    layer(x).sin().sum().backward()
    g = layer.weight.grad.clone()
    opt.step()
    assert torch.equal(layer.bias, bias)
    want = weight.double() - 0.1 * dense_reference(g, x)
    torch.testing.assert_close(layer.weight.double(), want, rtol=1e-4, atol=1e-6)


# 7. parametrized layers -------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "parametrize"])
def test_parametrized_weights_are_reported_and_left_to_the_base(wrap: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    if wrap == "weight_norm":
        layer = nn.utils.weight_norm(layer)
    elif wrap == "spectral_norm":
        layer = nn.utils.spectral_norm(layer)
    else:
        layer = nn.utils.parametrizations.orthogonal(layer)
    opt = DoPr(layer, base="sgd", lr=0.1, momentum=0.0)
    layer(torch.randn(8, 4)).sum().backward()
    raw = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    opt.preconditioner.precondition()
    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, raw[name]), name
    text = opt.describe()
    assert "computed from other parameters" in text
    assert " preconditioned (" not in text


# 8. keyword calls, lazy layers -----------------------------------------------------------------


def test_keyword_input_is_recorded() -> None:
    layer = nn.Linear(4, 3)
    ap = ActivationPreconditioner(layer)
    layer(input=torch.randn(6, 4)).sum().backward()
    assert ap.layers[""].n == 6
    ap.precondition()


def test_lazy_layers_describe_before_and_train_after_the_first_forward() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, lr=1e-2)
    assert "lazy" in opt.describe()
    x = torch.randn(16, 5)
    train_steps(model, opt, x, 2)
    assert opt.preconditioner.layers["0"].sigma[0].shape == (6, 6)
    assert "Σ 6x6" in opt.describe()


def test_muon_with_uninitialized_lazy_layers_says_what_to_do() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="run one forward"):
        DoPr(model, base="muon")


# 9. describe covers every parameter -------------------------------------------------------------


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 4, batch_first=True)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.bilinear = nn.Bilinear(4, 4, 4)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.deconv = nn.ConvTranspose2d(1, 2, 1)
        self.attention = nn.MultiheadAttention(4, 2)
        self.scale = nn.Parameter(torch.ones(4))
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("base", ["adamw", "muon"])
def test_describe_lists_every_parameter_with_its_fate(base: str) -> None:
    model = Zoo()
    opt = DoPr(model, base=base)
    fates = {f.name: f for f in opt.parameter_fates()}
    assert set(fates) == {name for name, _ in model.named_parameters()}
    text = opt.describe()
    for name in fates:
        assert name in text
    assert "no helper for GRU" in fates["gru.weight_ih_l0"].preconditioning
    assert "no helper for LayerNorm" in fates["norm.weight"].preconditioning
    assert "fused kernel" in fates["attention.in_proj_weight"].preconditioning
    assert "MultiheadAttention" in fates["attention.out_proj.weight"].preconditioning
    assert "no helper for Zoo" in fates["scale"].preconditioning
    assert fates["hidden.weight"].preconditioning.startswith("preconditioned (Σ 5x5)")
    assert "bias column" in fates["hidden.bias"].preconditioning
    if base == "muon":
        assert fates["hidden.weight"].base == "Muon"
        assert fates["head.weight"].base == "AdamW"
        assert fates["scale"].base == "AdamW"


# 10. non-finite inputs, re-created and abandoned optimizers, other base classes ---------------


def test_nan_input_on_a_non_collection_step_raises_and_leaves_parameters() -> None:
    layer = nn.Linear(4, 3)
    opt = DoPr(layer, lr=1e-2, cov_every=10)
    train_steps(layer, opt, torch.randn(8, 4), 1)
    before = [p.detach().clone() for p in layer.parameters()]
    bad = torch.randn(8, 4)
    bad[0, 0] = float("nan")
    opt.zero_grad()
    layer(bad).sum().backward()
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step()
    for p, b in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_recreating_dopr_takes_over_the_hooks_and_the_old_one_refuses_to_step() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    old = DoPr(model, lr=1e-2)
    new = DoPr(model, lr=1e-2)
    assert recording_hooks(model[0]) == 1
    train_steps(model, new, torch.randn(8, 4), 1)
    with pytest.raises(RuntimeError, match="newer"):
        train_steps(model, old, torch.randn(8, 4), 1)


def test_an_abandoned_optimizer_stops_recording() -> None:
    model = nn.Linear(4, 2)
    opt = DoPr(model, lr=1e-2)
    preconditioner = weakref.ref(opt.preconditioner)
    del opt
    gc.collect()
    assert preconditioner() is None
    assert recording_hooks(model) == 0


def test_a_base_class_without_weight_decay_is_accepted() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DoPr(model, base=torch.optim.Rprop, lr=1e-2)
    train_steps(model, opt, torch.randn(8, 4), 2)
    with pytest.raises(ValueError, match="takes no weight_decay"):
        DoPr(model, base=torch.optim.Rprop, lr=1e-2, weight_decay=0.1)


# 11. clipping the preconditioned gradient ---------------------------------------------------


def test_max_grad_norm_bounds_the_preconditioned_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(64, 16) * torch.logspace(-3, 0, 16)  # ill-conditioned inputs: AP amplifies
    for clip, bound in ((None, None), (0.1, 0.1)):
        net = copy.deepcopy(model)
        opt = DoPr(net, base="sgd", lr=1.0, momentum=0.0, damping=1e-6, max_grad_norm=clip)
        before = torch.cat([p.detach().flatten() for p in net.parameters()])
        opt.zero_grad()
        net(x).square().mean().backward()
        nn.utils.clip_grad_norm_(net.parameters(), 0.1)  # the raw clip a loop applies
        opt.step()
        after = torch.cat([p.detach().flatten() for p in net.parameters()])
        norm = float((after - before).norm())
        if bound is None:
            assert norm > 3 * 0.1  # the raw clip does not bound what AP makes of the gradient
        else:
            assert norm == pytest.approx(bound, rel=1e-4)


# 12. transferable step size for SGD ----------------------------------------------------------


def test_grad_norm_grafting_gives_each_layer_sgds_step_length() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(32, 8) * torch.logspace(-2, 0, 8)
    net = copy.deepcopy(model)
    opt = DoPr(net, base="sgd", lr=0.1, momentum=0.0, grafting="grad_norm")
    opt.zero_grad()
    net(x).square().mean().backward()
    raw = [torch.cat([net[i].weight.grad, net[i].bias.grad[:, None]], 1).norm() for i in (0, 2)]
    before = [torch.cat([net[i].weight, net[i].bias[:, None]], 1).detach() for i in (0, 2)]
    opt.step()
    for i, r, b in zip((0, 2), raw, before, strict=True):
        step = torch.cat([net[i].weight, net[i].bias[:, None]], 1).detach() - b
        assert float(step.norm()) == pytest.approx(0.1 * float(r), rel=1e-4)


# Wide layers: block-diagonal Σ ---------------------------------------------------------------


def test_one_block_covering_the_layer_is_exactly_the_dense_preconditioner() -> None:
    torch.manual_seed(0)
    model = nn.Linear(12, 3)
    twin = copy.deepcopy(model)
    x = torch.randn(32, 12)
    train_steps(model, DoPr(model, lr=1e-2, cov_every=1), x, 3)
    train_steps(twin, DoPr(twin, lr=1e-2, cov_every=1, max_block_size=13), x, 3)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_block_diagonal_sigma_matches_its_formula_and_stores_only_blocks() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 3)  # dim 11 with the bias; blocks of 4: [0,4) [4,8) [8,11)
    ap = ActivationPreconditioner(layer, damping=GAMMA, max_block_size=4)
    x = torch.randn(64, 10)
    layer(x).sin().sum().backward()
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).double()
    ap.precondition()
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    rows = with_ones(x).double()
    sigma = rows.T @ rows / rows.shape[0]
    lam = GAMMA * torch.trace(sigma) / 11
    want = torch.empty_like(g)
    for start, stop in ((0, 4), (4, 8), (8, 11)):
        block = sigma[start:stop, start:stop] + lam * torch.eye(stop - start).double()
        want[:, start:stop] = g[:, start:stop] @ torch.linalg.inv(block)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    state = ap.layers[""]
    assert [tuple(b.shape) for b in state.sigma] == [(4, 4), (4, 4), (3, 3)]
    assert state.inverse.numel() == 16 + 16 + 9


def test_settings_are_validated_in_one_place() -> None:
    with pytest.raises(ValueError, match="max_block_size must be an integer >= 1"):
        DoPr(nn.Linear(2, 2), max_block_size=0)
    with pytest.raises(ValueError, match="unknown activation-preconditioner settings"):
        ActivationPreconditioner(nn.Linear(2, 2), dampening=0.1)
    with pytest.raises(TypeError, match="not both"):
        DoPr(nn.Linear(2, 2), config=APConfig(), damping=0.1)
    assert APConfig(damping=1).damping == 1.0
    assert APConfig(cov_every=3).overrides() == {"cov_every": 3}


def test_functional_use_of_a_weight_alongside_its_module_is_pooled_only_for_the_module() -> None:
    layer = nn.Linear(3, 2)
    ap = ActivationPreconditioner(layer)
    x = torch.randn(4, 3)
    (layer(x).sum() + F.linear(x, layer.weight).sum()).backward()
    assert ap.layers[""].n == 4
    ap.precondition()


def test_distributed_checkpoint_round_trip_with_the_preconditioner_saved_beside(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, lr=1e-2)
    x = torch.randn(16, 4)
    train_steps(model, opt, x, 3)
    twin_model = copy.deepcopy(model)
    with pytest.warns(UserWarning):  # DCP outside a process group
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    torch.save(opt.state_dict()["dopr"], tmp_path / "dopr.pt")

    twin = DoPr(twin_model, lr=1e-2)
    with pytest.warns(UserWarning):
        state = {"optim": get_optimizer_state_dict(twin_model, twin)}
        dcp.load(state, checkpoint_id=tmp_path)
    with pytest.warns(UserWarning, match="no 'dopr' entry"):
        set_optimizer_state_dict(twin_model, twin, state["optim"])
    twin.preconditioner.load_state_dict(torch.load(tmp_path / "dopr.pt")["preconditioner"])
    train_steps(model, opt, x, 2)
    train_steps(twin_model, twin, x, 2)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grad_scaler_steps_dopr_and_skips_steps_with_inf_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DoPr(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(16, 4)
    for scale in (1.0, 1.0, float("inf")):
        opt.zero_grad()
        scaler.scale(model(x).square().mean() * scale).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
    assert opt.preconditioner.steps == 2  # the inf step was skipped before DoPr saw it
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_hook_guards_are_set_when_the_compiler_is_imported_after_the_preconditioner() -> None:
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from beyondloss.optim import ActivationPreconditioner\n"
        "ActivationPreconditioner(torch.nn.Linear(2, 2))\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "import torch._dynamo\n"
        "assert not torch._dynamo.config.skip_nnmodule_hook_guards\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
