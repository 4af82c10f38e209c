"""DoPr's update equals an independent dense computation of M = G (Σ + λI)⁻¹, and its edges."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beyondloss.optim import ActivationPreconditioner, DoPr, make_optimizer, muon_parameter_split

LR = 0.1
GAMMA = 1e-2


def sgd_dopr(model: nn.Module, **kwargs) -> DoPr:
    """Plain SGD base (no momentum, no decay) so the step is exactly −η·M."""
    return DoPr(model, base="sgd", lr=LR, momentum=0.0, damping=GAMMA, **kwargs)


def expected_update(grad: torch.Tensor, rows: torch.Tensor, mode: str = "trace_over_dim"):
    """−η G (Σ + λI)⁻¹ in float64 from explicit rows (n, dim) and G (d_out, dim)."""
    rows = rows.double()
    sigma = rows.T @ rows / rows.shape[0]
    trace = torch.trace(sigma)
    lam = GAMMA * (trace / sigma.shape[0] if mode == "trace_over_dim" else trace)
    precond = torch.linalg.inv(sigma + lam * torch.eye(sigma.shape[0], dtype=torch.float64))
    return -LR * grad.double() @ precond


def step_and_delta(model: nn.Module, opt: DoPr, inputs: torch.Tensor):
    """One step on loss = sum(sin(output)); returns the raw gradients and the parameter deltas."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(inputs).sin().sum().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]  # raw: before the step
    opt.step()
    deltas = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    return grads, deltas


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["trace_over_dim", "trace"])
def test_linear_update_matches_dense_formula(bias: bool, mode: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias)
    x = torch.randn(3, 10, 6)  # leading dims are flattened into rows
    opt = sgd_dopr(layer, damping_mode=mode)
    grads, deltas = step_and_delta(layer, opt, x)
    rows = x.reshape(-1, 6)
    g = grads[0]
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
        g = torch.cat([grads[0], grads[1][:, None]], dim=1)
    want = expected_update(g, rows, mode)
    got = deltas[0] if not bias else torch.cat([deltas[0], deltas[1][:, None]], dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def explicit_patches(x: torch.Tensor, k: int, padding: int) -> torch.Tensor:
    """im2col by slicing (independent of F.unfold): rows (N·H_out·W_out, C·k·k), stride 1."""
    x = F.pad(x, (padding,) * 4)
    n, c, h, w = x.shape
    rows = [
        x[:, :, i : i + k, j : j + k].reshape(n, c * k * k)
        for i in range(h - k + 1)
        for j in range(w - k + 1)
    ]
    return torch.stack(rows, dim=1).reshape(-1, c * k * k)


def test_conv2d_update_matches_dense_formula() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    opt = sgd_dopr(conv)
    grads, deltas = step_and_delta(conv, opt, x)
    rows = explicit_patches(x, 3, 1)
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    g = torch.cat([grads[0].reshape(5, -1), grads[1][:, None]], dim=1)
    got = torch.cat([deltas[0].reshape(5, -1), deltas[1][:, None]], dim=1)
    torch.testing.assert_close(got.double(), expected_update(g, rows), rtol=1e-4, atol=1e-6)


def test_conv1d_is_preconditioned_like_its_patches() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, kernel_size=3, bias=False)
    x = torch.randn(4, 2, 9)
    opt = sgd_dopr(conv)
    grads, deltas = step_and_delta(conv, opt, x)
    rows = x.unfold(2, 3, 1).permute(0, 2, 1, 3).reshape(-1, 6)
    torch.testing.assert_close(
        deltas[0].reshape(3, -1).double(),
        expected_update(grads[0].reshape(3, -1), rows),
        rtol=1e-4,
        atol=1e-6,
    )


def test_embedding_update_uses_diagonal_token_frequencies() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3)
    tokens = torch.tensor([[0, 1, 1, 2], [2, 2, 5, 0]])
    opt = sgd_dopr(emb)
    grads, deltas = step_and_delta(emb, opt, tokens)
    one_hot = F.one_hot(tokens.reshape(-1), 7)
    want = expected_update(grads[0].T, one_hot).T  # linear convention: G = W.gradᵀ
    torch.testing.assert_close(deltas[0].double(), want, rtol=1e-4, atol=1e-6)
    assert opt.preconditioner.layers[""].sigma[0].shape == (7,)


def test_pooled_forwards_equal_one_concatenated_batch() -> None:
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = copy.deepcopy(a)
    x = torch.randn(16, 4)
    opt_a, opt_b = sgd_dopr(a), sgd_dopr(b)
    opt_a.zero_grad()
    a(x[:8]).sin().sum().backward()
    a(x[8:]).sin().sum().backward()
    opt_a.step()
    step_and_delta(b, opt_b, x)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


def test_statistics_record_grad_enabled_forwards_whatever_the_module_mode() -> None:
    layer = nn.Linear(4, 2)
    ap = ActivationPreconditioner(layer)
    with torch.no_grad():
        layer(torch.randn(5, 4))
    with torch.inference_mode():
        layer(torch.randn(5, 4))
    assert ap.layers[""].n == 0
    layer.eval()  # fine-tuning with dropout off is still training
    layer(torch.randn(5, 4))
    assert ap.layers[""].n == 5
    layer.train()
    layer(torch.randn(5, 4))
    assert ap.layers[""].n == 10


def test_cov_every_records_only_on_collection_steps() -> None:
    layer = nn.Linear(4, 2)
    ap = ActivationPreconditioner(layer, cov_every=3, inverse_every=1)
    counts = []
    for _ in range(6):
        layer(torch.randn(5, 4)).sum().backward()
        counts.append(ap.layers[""].n)
        ap.precondition()
    assert counts == [5, 0, 0, 5, 0, 0]


def test_inverse_is_reused_between_refreshes() -> None:
    layer = nn.Linear(4, 2)
    ap = ActivationPreconditioner(layer, cov_every=1, inverse_every=2, ema_decay=0.0)
    inverses = []
    for _ in range(4):
        layer(torch.randn(8, 4)).sum().backward()
        ap.precondition()
        inverses.append(ap.layers[""].inverse.blocks[0].clone())
    assert torch.equal(inverses[0], inverses[1])
    assert not torch.equal(inverses[1], inverses[2])
    assert torch.equal(inverses[2], inverses[3])


def test_ema_of_sigma_across_steps() -> None:
    layer = nn.Linear(2, 1, bias=False)
    ap = ActivationPreconditioner(layer, ema_decay=0.5, cov_every=1)
    xs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    for x in xs:
        layer(x).sum().backward()
        ap.precondition()
    torch.testing.assert_close(ap.layers[""].sigma[0], torch.tensor([[0.5, 0.0], [0.0, 2.0]]))


@pytest.mark.parametrize(
    "inputs",
    [
        torch.zeros(16, 8),
        torch.randn(16, 1) @ torch.randn(1, 8),  # rank one
        torch.randn(2, 8) * 1e6,  # n < d, huge scale
    ],
    ids=["zero", "rank-deficient", "few-huge-rows"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_degenerate_inputs_give_finite_updates(inputs: torch.Tensor, bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 3, bias=bias)
    opt = DoPr(layer, base="adamw", lr=1e-3, damping=0.0)
    for _ in range(3):
        opt.zero_grad()
        layer(inputs).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_bf16_autocast_accumulates_fp32_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    opt = DoPr(model, base="adamw", lr=1e-3)
    x = torch.randn(64, 16)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
    for state in opt.preconditioner.layers.values():
        assert state.sigma[0].dtype == torch.float32
        assert state.inverse.blocks[0].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_inputs_raise_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = DoPr(model)
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    model(x).sum().backward()
    with pytest.raises(FloatingPointError, match="'0'"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"damping": -1e-3}, "damping"),
        ({"damping_mode": "frobenius"}, "damping_mode"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"cov_every": 0}, "cov_every"),
        ({"inverse_every": 1.5}, "inverse_every"),
        ({"base": "lion"}, "base"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DoPr(nn.Linear(2, 2), **kwargs)


def test_parameters_instead_of_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="model itself"):
        DoPr(nn.Linear(2, 2).parameters())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.proj(self.norm(h)))


def test_describe_accounts_for_every_unsupported_layer() -> None:
    model = Tied()
    opt = DoPr(model, exclude=["proj"])
    text = opt.describe()
    assert set(opt.preconditioner.layers) == set()
    excluded = opt.preconditioner.excluded
    assert "shares a parameter" in excluded["embed"] and "shares a parameter" in excluded["head"]
    assert "MultiheadAttention" in excluded["attn.out_proj"]
    assert excluded["proj"] == "excluded by name pattern"
    assert "not preconditioned" in text
    opt.zero_grad()
    model(torch.randint(0, 10, (2, 5))).sum().backward()
    opt.step()  # everything goes to the base optimizer untouched; must not fail


@pytest.mark.parametrize(
    ("scope", "kept"),
    [
        ("all", ["0", "2", "4"]),
        ("hidden", ["2"]),
        ("no_input", ["2", "4"]),
        ("no_head", ["0", "2"]),
    ],
)
def test_scope_leaves_the_input_layer_or_head_to_the_base_optimizer(
    scope: str, kept: list[str]
) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)]
    model = nn.Sequential(*layers)
    opt = DoPr(model, base="sgd", lr=0.1, scope=scope, cov_every=1, inverse_every=1)
    assert list(opt.preconditioner.layers) == kept
    x = torch.randn(16, 3)
    model(x).square().sum().backward()
    raw = {name: model.get_submodule(name).weight.grad.clone() for name in ("0", "2", "4")}
    before = {name: model.get_submodule(name).weight.detach().clone() for name in raw}
    opt.step()
    for name, grad in raw.items():
        step = before[name] - model.get_submodule(name).weight.detach()
        # A layer out of scope takes the plain SGD step; one in scope a preconditioned one.
        assert torch.allclose(step, 0.1 * grad) == (name not in kept), name
    with pytest.raises(ValueError, match="scope must be one of all, hidden"):
        DoPr(model, scope="middle")


def test_layer_whose_forward_bypasses_hooks_passes_through_until_recorded() -> None:
    layer = nn.Linear(3, 2)
    ap = ActivationPreconditioner(layer)
    F.linear(torch.randn(4, 3), layer.weight, layer.bias).sum().backward()
    raw = layer.weight.grad.clone()
    with pytest.warns(UserWarning, match="without recorded inputs"):
        ap.precondition()
    assert torch.equal(layer.weight.grad, raw)
    layer.zero_grad()
    layer(torch.randn(4, 3)).sum().backward()  # a forward through the module: recorded
    raw = layer.weight.grad.clone()
    ap.precondition()
    assert not torch.equal(layer.weight.grad, raw)


def test_muon_takes_hidden_linear_weights_and_adamw_the_rest() -> None:
    model = nn.Sequential(
        nn.Embedding(5, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
    )
    muon, adamw = muon_parameter_split(model)
    assert {id(p) for p in muon} == {id(model[1].weight), id(model[3].weight)}
    assert id(model[4].weight) in {id(p) for p in adamw}
    opt = DoPr(model, base="muon", lr=0.01)
    assert [type(o).__name__ for o in opt.base_optimizers] == ["Muon", "AdamW"]


def test_scheduler_changes_reach_the_base_optimizers() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
    opt = DoPr(model, base="muon", lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    scheduler.step()
    assert all(g["lr"] == 0.05 for o in opt.base_optimizers for g in o.param_groups)


@pytest.mark.parametrize("name", ["dopr-adamw", "dopr-muon", "dopr-sgd"])
def test_state_dict_resume_continues_exactly(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"cov_every": 2, "inverse_every": 3, "ema_decay": 0.9}
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    batches = [torch.randn(32, 3) for _ in range(12)]

    def run(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    opt = make_optimizer(name, model, 1e-2, 1e-2, **kwargs)
    run(model, opt, batches[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, batches[5:])

    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(name, resumed, 1e-2, 1e-2, **kwargs)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, batches[5:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def _train_copies(opt_a, model_a, opt_b, model_b, steps: int = 5) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4)
        for opt, model in ((opt_a, model_a), (opt_b, model_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()


def test_without_ap_dopr_is_exactly_its_base_optimizer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    pairs = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1),
    }
    for base, reference in pairs.items():
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        ours = DoPr(a, base=base, lr=0.01, weight_decay=0.1, activation_preconditioning=False)
        _train_copies(ours, a, reference(b), b)
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), base


def test_sgd_weight_decay_is_decoupled() -> None:
    """θ ← (1 − ηλ)θ − η·v with v the momentum buffer of the raw gradient."""
    layer = nn.Linear(3, 1, bias=False)
    theta = layer.weight.detach().clone()
    opt = DoPr(layer, base="sgd", lr=0.1, weight_decay=0.5, activation_preconditioning=False)
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), (1 - 0.1 * 0.5) * theta - 0.1 * grad)


def test_muon_base_is_torch_muon_plus_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ours = DoPr(a, base="muon", lr=0.01, weight_decay=0.1, activation_preconditioning=False)
    muon_params, adamw_params = muon_parameter_split(b)
    muon = torch.optim.Muon(muon_params, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(adamw_params, lr=0.01, weight_decay=0.1)

    class Both:
        def zero_grad(self) -> None:
            muon.zero_grad()
            adamw.zero_grad()

        def step(self) -> None:
            muon.step()
            adamw.step()

    _train_copies(ours, a, Both(), b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
