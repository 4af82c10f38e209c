"""DoPr inside ``transformers.Trainer``: the recipes of docs/integrations.md, trained for real.

A one-block Llama built from a config (no download, every projection an ``nn.Linear``) learns
``next token = token + 1 (mod 32)`` on CPU in a few dozen steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from beyondloss.integrations.huggingface import (  # noqa: E402
    DoPrTrainer,
    decay_parameter_names,
    dopr_from_args,
    dopr_kwargs_from_args,
    trainer_parameter_groups,
)
from beyondloss.optim import DoPr  # noqa: E402
from beyondloss.optim.dopr import SGD_DECAY_KEY  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB, LENGTH = 32, 16
WEIGHT_DECAY = 0.1


class CountingTokens(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod VOCAB): the next token is always learnable."""

    def __init__(self, n: int = 64) -> None:
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
        self.tokens = (start + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 20,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


def dopr_of(trainer: Trainer) -> DoPr:
    """The DoPr inside the Trainer's optimizer (Accelerate wraps it in AcceleratedOptimizer)."""
    optimizer = trainer.optimizer
    while not isinstance(optimizer, DoPr):
        optimizer = optimizer.optimizer
    return optimizer


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


class Recorder(TrainerCallback):
    """Per optimizer step, just before ``optimizer.step()``: grad norm, group LRs, AP steps."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.lrs: list[list[float]] = []
        self.ap_steps: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_norms.append(torch.stack([g.norm() for g in grads]).norm().item())
        dopr = optimizer
        while not isinstance(dopr, DoPr):
            dopr = dopr.optimizer
        self.lrs.append([group["lr"] for group in dopr.param_groups])
        self.ap_steps.append(dopr.preconditioner.steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 20 steps three ways: DoPr, DoPr with AP off, and the Trainer's own AdamW.

    With weight decay, which the Trainer's AdamW applies to weights but not to norm gains.
    """
    out = tmp_path_factory.mktemp("hf")
    results = {}
    for name in ("dopr", "ap_off", "trainer_adamw"):
        model = tiny_llama()
        args = training_args(out / name, optim="adamw_torch", weight_decay=WEIGHT_DECAY)
        if name == "trainer_adamw":
            trainer = Trainer(model=model, args=args, train_dataset=CountingTokens())
        else:
            kwargs = {"activation_preconditioning": name == "dopr"}
            trainer = DoPrTrainer(
                model=model, args=args, train_dataset=CountingTokens(), dopr_kwargs=kwargs
            )
        trainer.train()
        results[name] = (trainer, parameters(model))
    return results


def test_dopr_trainer_lowers_the_loss_and_preconditions_every_linear_layer(runs):
    trainer, _ = runs["dopr"]
    curve = losses(trainer)
    assert len(curve) == 20
    assert curve[-1] < 0.75 * curve[0]
    dopr = dopr_of(trainer)
    description = dopr.describe()
    linears = [n for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8
    for name in linears:
        assert any(name in line and "preconditioned (" in line for line in description.splitlines())
    assert set(linears) <= set(dopr.preconditioner.layers)
    # One AP step per optimizer step: the statistics were collected and consumed every step.
    assert dopr.preconditioner.steps == trainer.state.global_step == 20


def test_ap_off_is_the_trainers_adamw_and_ap_changes_the_update(runs):
    trainer, dopr = runs["dopr"]
    ap_off_trainer, ap_off = runs["ap_off"]
    _, adamw = runs["trainer_adamw"]
    assert {g["weight_decay"] for g in dopr_of(ap_off_trainer).param_groups} == {WEIGHT_DECAY, 0}
    # lr, betas, eps, the schedule and the decay groups map exactly: the same trajectory with
    # weight_decay=0.1 (measured: bit-identical; decaying the norm gains too, as DoPr did when
    # built from the model alone, ends 1e-2 off the Trainer's run).
    assert max_difference(ap_off, adamw) < 1e-5
    # Activation preconditioning really changed the updates.
    assert max_difference(dopr, adamw) > 1e-2


def test_trainer_scheduler_drives_every_dopr_group_and_max_grad_norm_clips_the_raw_gradient(
    tmp_path,
):
    """Recipe 2 (``optimizers=(dopr_from_args(...), None)``) with a two-optimizer base (Muon)."""
    if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
        pytest.skip("this transformers has no on_pre_optimizer_step callback to observe with")
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=6, warmup_steps=2, max_grad_norm=0.05)
    optimizer = dopr_from_args(model, args, base="muon")
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=CountingTokens(),
        optimizers=(optimizer, None),
        callbacks=[recorder],
    )
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    # Muon (the decayed hidden weights) + AdamW (decayed embedding and head, undecayed norms).
    assert len(optimizer.base_optimizers) == 2 and len(optimizer.param_groups) == 3
    # Linear warmup over 2 steps, then linear decay to 0 at step 6, in every group.
    expected = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    for step, lrs in enumerate(recorder.lrs):
        assert lrs == pytest.approx([1e-2 * expected[step]] * 3)
    # The Trainer clips before optimizer.step(): DoPr receives the clipped raw gradient, and
    # has not preconditioned anything of this step yet when the clip happens.
    assert all(norm == pytest.approx(0.05, rel=1e-4) for norm in recorder.grad_norms)
    assert recorder.ap_steps == list(range(6))
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_dopr_max_grad_norm_clips_the_preconditioned_update_inside_the_trainer(tmp_path):
    """args.max_grad_norm clips the raw gradient; DoPr's own max_grad_norm the preconditioned one.

    SGD without momentum or decay at a constant LR: the step is exactly -lr times what the base
    optimizer receives, so its norm shows DoPr's clip.
    """
    if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
        pytest.skip("this transformers has no on_pre_optimizer_step callback to observe with")
    model = tiny_llama()
    lr = 1e-2
    args = training_args(
        tmp_path, max_steps=1, learning_rate=lr, warmup_steps=0, lr_scheduler_type="constant"
    )
    recorder = Recorder()
    trainer = DoPrTrainer(
        model=model,
        args=args,
        train_dataset=CountingTokens(),
        callbacks=[recorder],
        dopr_kwargs={"base": "sgd", "momentum": 0.0, "max_grad_norm": 0.01},
    )
    before = parameters(model)
    trainer.train()
    moves = [(a - b).norm() for a, b in zip(before, parameters(model), strict=True)]
    step = torch.stack(moves).norm() / lr
    # The raw gradient, clipped by the Trainer to args.max_grad_norm = 1 before step(), ...
    assert recorder.grad_norms[0] == pytest.approx(1.0, rel=1e-4)
    # ... then preconditioned and clipped by DoPr to its own max_grad_norm.
    assert step.item() == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_pools_the_micro_batches_into_one_dopr_step(tmp_path):
    """Batch 8 in one pass and batch 4 accumulated twice take the same DoPr steps."""
    dopr_kwargs = {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}
    finals, trainers = [], []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = tiny_llama()
        args = training_args(
            tmp_path / f"b{batch}",
            max_steps=5,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = DoPrTrainer(
            model=model, args=args, train_dataset=CountingTokens(), dopr_kwargs=dopr_kwargs
        )
        trainer.train()
        finals.append(parameters(model))
        trainers.append(trainer)
    assert dopr_of(trainers[1]).preconditioner.steps == 5
    # Measured: 2e-5 (fp32 rounding, amplified by the inverse of Σ; 2e-8 with AP off); with
    # Σ from the last micro-batch alone instead of both, the difference is 4e-2.
    assert max_difference(*finals) < 1e-3


def test_checkpoint_resume_restores_dopr_exactly(tmp_path):
    dopr_kwargs = {"cov_every": 2, "inverse_every": 2}
    args = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "logging_steps": 100}

    model = tiny_llama()
    DoPrTrainer(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=CountingTokens(),
        dopr_kwargs=dopr_kwargs,
    ).train()
    uninterrupted = parameters(model)
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()

    resumed_model = tiny_llama()
    resumed = DoPrTrainer(
        model=resumed_model,
        args=training_args(tmp_path, **{**args, "save_strategy": "no"}),
        train_dataset=CountingTokens(),
        dopr_kwargs=dopr_kwargs,
    )
    with warnings.catch_warnings():
        # A DoPr that lost its statistics warns that layers got gradients without inputs.
        warnings.filterwarnings("error", message=".*without recorded inputs")
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert dopr_of(resumed).preconditioner.steps == 6
    assert max_difference(parameters(resumed_model), uninterrupted) == 0.0


def test_dopr_kwargs_from_args_takes_adam_settings_only_for_adam_bases(tmp_path):
    args = training_args(tmp_path, learning_rate=3e-4, weight_decay=0.1, adam_beta2=0.95)
    adamw = dopr_kwargs_from_args(args)
    assert adamw == {
        "base": "adamw",
        "lr": 3e-4,
        "weight_decay": 0.1,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
    }
    assert dopr_kwargs_from_args(args, "sgd") == {"base": "sgd", "lr": 3e-4, "weight_decay": 0.1}
    optimizer = dopr_from_args(tiny_llama(), args, lr=1e-3, damping=1e-2)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_projections_are_preconditioned():
    model = tiny_gpt2()
    fates = {f.name: f for f in DoPr(model).parameter_fates()}
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert sorted(n.rsplit(".", 1)[-1] for n in conv1d) == ["c_attn", "c_fc", "c_proj", "c_proj"]
    for name in conv1d:
        assert fates[f"{name}.weight"].preconditioning.startswith("preconditioned (")
        assert fates[f"{name}.bias"].preconditioning.startswith("preconditioned with")
    assert fates["transformer.wpe.weight"].preconditioning.startswith("preconditioned (")
    # The tied embedding / head is the one layer left out, and says why.
    assert (
        "shares a parameter with another module" in fates["transformer.wte.weight"].preconditioning
    )


@pytest.mark.parametrize("layer", ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"])
def test_one_dopr_step_on_a_gpt2_conv1d_is_the_dense_formula(layer):
    """SGD without momentum, one step: ΔW = -lr M with M = G (Σ + λI)⁻¹ in linear convention."""
    model = tiny_gpt2()
    damping, lr = 1e-2, 0.1
    conv = model.get_submodule(layer)
    inputs = []
    conv.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    optimizer = DoPr(model, base="sgd", lr=lr, momentum=0.0, damping=damping)
    before_w, before_b = conv.weight.detach().clone(), conv.bias.detach().clone()

    tokens = CountingTokens(n=4).tokens
    model(input_ids=tokens, labels=tokens).loss.backward()
    # G in linear convention: (d_out, d_in + 1) = [W.gradᵀ, b.grad] (Conv1D stores W as d_in×d_out).
    grad = torch.cat([conv.weight.grad.T, conv.bias.grad[:, None]], dim=1).double()
    optimizer.step()

    (z,) = inputs
    z = z.reshape(-1, z.shape[-1]).double()
    z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    sigma = z1.T @ z1 / len(z1)
    ridge = damping * sigma.trace() / len(sigma)
    expected = grad @ torch.linalg.inv(sigma + ridge * torch.eye(len(sigma), dtype=z.dtype))
    step = (
        torch.cat(
            [(before_w - conv.weight.detach()).T, (before_b - conv.bias.detach())[:, None]], dim=1
        ).double()
        / lr
    )
    assert step.shape == (conv.nf, conv.weight.shape[0] + 1)
    # Measured: 5e-6 (c_attn) and 4e-6 (c_proj), fp32 DoPr against the float64 formula; with
    # λ = γ·tr(Σ) instead of γ·tr(Σ)/dim the error is 0.4 and 0.9.
    assert torch.linalg.norm(step - expected) <= 1e-4 * torch.linalg.norm(expected)
    # AP really changed it: the raw gradient is far from the preconditioned one.
    assert torch.linalg.norm(step - grad) > 0.1 * torch.linalg.norm(grad)


def trainer_decay(optimizer) -> dict[int, float]:
    """{id(parameter): weight decay} over every param group (DoPr's or a torch optimizer's)."""
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_dopr_decays_exactly_the_parameters_the_trainer_decays(tmp_path):
    args = training_args(tmp_path, weight_decay=0.1, optim="adamw_torch")
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: in neither optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args)
    expected = trainer_decay(trainer.create_optimizer())
    exempt = {names[i] for i, decay in expected.items() if decay == 0.0}
    assert exempt == {n for n in names.values() if "norm" in n}  # Llama has no biases
    assert id(model.model.embed_tokens.weight) not in expected

    assert decay_parameter_names(model) == trainer.get_decay_parameter_names(model)
    for base in ("adamw", "sgd", "muon"):
        dopr = dopr_from_args(model, args, base=base)
        decays = trainer_decay(dopr)
        if base == "sgd":  # DoPr's decoupled SGD decay lives under its own key
            decays = {id(p): g[SGD_DECAY_KEY] for g in dopr.param_groups for p in g["params"]}
        assert decays == expected, base
    # A weight_decay given to dopr_from_args replaces args.weight_decay in the decay group.
    overridden = trainer_decay(dopr_from_args(model, args, weight_decay=0.05))
    assert overridden == {i: 0.05 if decay else 0.0 for i, decay in expected.items()}
    assert trainer_decay(DoPr(model, trainer_parameter_groups(model, 0.1))) == expected
    fates = {f.name: f for f in dopr_from_args(model, args).parameter_fates()}
    assert fates["model.embed_tokens.weight"].base == "-"

    class NoDecayOnHead(DoPrTrainer):
        def get_decay_parameter_names(self, model):
            return [n for n in super().get_decay_parameter_names(model) if "lm_head" not in n]

    for trainer_cls in (DoPrTrainer, NoDecayOnHead):
        built = trainer_decay(trainer_cls(model=model, args=args).create_optimizer())
        want = dict(expected)
        if trainer_cls is NoDecayOnHead:
            want[id(model.lm_head.weight)] = 0.0
        assert built == want, trainer_cls.__name__


def test_optimizer_factory_gives_dopr_the_model_and_trains(tmp_path):
    """transformers 5 calls ``factory()(model, **kwargs)`` when the first element is no class."""
    from transformers import trainer as trainer_module

    if not hasattr(trainer_module, "is_optimizer_factory"):
        pytest.skip("this transformers has no optimizer factories")
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=10, learning_rate=1e-2, weight_decay=0.1),
        train_dataset=CountingTokens(),
        optimizer_cls_and_kwargs=(lambda: DoPr, {"lr": 2e-2}),
    )
    trainer.train()
    dopr = dopr_of(trainer)
    assert dopr.model is model
    curve = losses(trainer)
    assert curve[-1] < 0.9 * curve[0]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(linears) <= set(dopr.preconditioner.layers)
    assert dopr.preconditioner.steps == trainer.state.global_step == 10
    # Only the kwargs given reach DoPr, nothing from args: its lr (the schedule's base), one
    # group, every parameter at DoPr's default decay.
    (group,) = dopr.param_groups
    assert group["initial_lr"] == 2e-2 and group["weight_decay"] == 0.0


def test_optimizer_cls_and_kwargs_with_the_class_itself_fails_clearly(tmp_path):
    """Given the class, the Trainer passes parameter groups, not the model; DoPr refuses them."""
    if "optimizer_cls_and_kwargs" not in Trainer.__init__.__code__.co_varnames:
        pytest.skip("this transformers has no optimizer_cls_and_kwargs")
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=CountingTokens(),
        optimizer_cls_and_kwargs=(DoPr, {"lr": 1e-3}),
    )
    with pytest.raises(TypeError, match="DoPr needs the model itself"):
        trainer.train()


def test_dopr_trainer_works_with_model_init(tmp_path):
    """``model_init`` rejects ``optimizers=``; DoPrTrainer builds DoPr on the fresh model."""
    args = training_args(tmp_path, max_steps=3)
    with pytest.raises(RuntimeError, match="model_init"):
        Trainer(
            model_init=tiny_llama,
            args=args,
            train_dataset=CountingTokens(),
            optimizers=(DoPr(tiny_llama()), None),
        )
    trainer = DoPrTrainer(model_init=tiny_llama, args=args, train_dataset=CountingTokens())
    trainer.train()
    dopr = dopr_of(trainer)
    assert dopr.preconditioner.steps == 3
    assert {id(p) for g in dopr.param_groups for p in g["params"]} == {
        id(p) for p in trainer.model.parameters()
    }
