"""Time one training step (forward + backward + optimizer step) of DoPr against its base.

For each MLP width d and batch size B, every optimizer trains the same model on the same data
in one process; rounds of ``--steps`` steps are interleaved across optimizers (ABAB...) so that
machine noise hits all of them alike, and the per-step time is the median over rounds. Reported:
the time ratio DoPr-X / X and, beside it, the FLOP floor

    1 + d / (3 B)

i.e. the cost of the extra product G·P (2·d_out·d² flops per layer) against forward + backward
(6·B·d_out·d). Memory is the bytes held by parameters, gradients, optimizer state and the
activation preconditioner's Σ and P (on CUDA, also the peak allocated during a step).

    python benchmarks/optimizer_step.py                      # the table in docs/benchmark.md
    python benchmarks/optimizer_step.py --dims 512 --batches 1024 --rounds 3

Each DoPr optimizer is timed twice: with its amortized default (statistics and inverse every 10
steps) and with the per-batch formula ``PER_BATCH`` (Σ and P from every batch).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from beyondloss.optim import make_optimizer

PAIRS = (("adamw", "dopr-adamw"), ("muon", "dopr-muon"), ("sgd", "dopr-sgd"))
LAYERS = 3


def make_mlp(d: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(LAYERS):
        blocks += [nn.Linear(d, d), nn.GELU()]
    return nn.Sequential(*blocks[:-1]).to(device)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients, optimizer state and AP statistics/factors."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    ap = getattr(optimizer, "preconditioner", None)
    if ap is not None:
        for layer in ap.layers.values():
            tensors += [*layer.sigma, *layer.inverse.blocks]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Trainee:
    """One optimizer, its own copy of the model, and a step function."""

    def __init__(self, name: str, d: int, batch: int, device: str, **ap: int) -> None:
        self.name = name
        self.model = make_mlp(d, device)
        self.optimizer = make_optimizer(name, self.model, lr=1e-4, weight_decay=0.01, **ap)
        generator = torch.Generator(device=device).manual_seed(1)
        self.x = torch.randn(batch, d, device=device, generator=generator)
        self.y = torch.randn(batch, d, device=device, generator=generator)
        self.times: list[float] = []
        self.peak = 0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        nn.functional.mse_loss(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def round(self, steps: int) -> None:
        sync = torch.cuda.synchronize if self.x.is_cuda else (lambda: None)
        if self.x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        self.times.append((time.perf_counter() - began) / steps)
        if self.x.is_cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())


PER_BATCH = {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}
"""The per-batch formula, measured beside DoPr's amortized default (see docs/lorenz.md)."""


def memory_ratio(dopr: Trainee, base: Trainee) -> float:
    """Peak CUDA memory ratio, or on CPU the ratio of held bytes (see :func:`state_bytes`)."""
    if dopr.x.is_cuda:
        return dopr.peak / base.peak
    return state_bytes(dopr.model, dopr.optimizer) / state_bytes(base.model, base.optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="256,512,1024")
    parser.add_argument("--batches", default="256,1024,4096")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    batches = [int(v) for v in args.batches.split(",")]

    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; MLP of {LAYERS} d×d Linear layers; "
        f"median of {args.rounds} rounds × {args.steps} steps; per batch = {PER_BATCH}\n"
    )
    header = (
        "| d | B | base | base ms/step | DoPr ms/step | ratio | per-batch ms/step | ratio "
        "| floor 1+d/3B | memory ratio |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for d in dims:
        for batch in batches:
            trainees = [
                trainee
                for base, dopr in PAIRS
                for trainee in (
                    Trainee(base, d, batch, args.device),
                    Trainee(dopr, d, batch, args.device),
                    Trainee(dopr, d, batch, args.device, **PER_BATCH),
                )
            ]
            for trainee in trainees:  # warm up; the first step also builds Σ and P
                trainee.round(2)
                trainee.times.clear()
            for _ in range(args.rounds):
                for trainee in trainees:
                    trainee.round(args.steps)
            floor = 1 + d / (3 * batch)
            for base, dopr, per_batch in zip(*[iter(trainees)] * 3, strict=True):
                t_base, t_dopr, t_per_batch = (
                    statistics.median(t.times) for t in (base, dopr, per_batch)
                )
                print(
                    f"| {d} | {batch} | {base.name} | {1e3 * t_base:.2f} | {1e3 * t_dopr:.2f} "
                    f"| {t_dopr / t_base:.2f} | {1e3 * t_per_batch:.2f} "
                    f"| {t_per_batch / t_base:.2f} | {floor:.2f} "
                    f"| {memory_ratio(dopr, base):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
