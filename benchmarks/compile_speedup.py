"""Speed-up of ``torch.compile`` on a DoPr training step, against AdamW's, and recompiles.

The same MLP (three d×d ``nn.Linear`` layers, GELU) trains with AdamW and DoPr-AdamW (its
amortized default), each eager and with the model compiled (inductor, default mode; the
optimizer step stays eager). Rounds of ``--steps`` steps are interleaved across the four
(ABAB...), so machine noise hits all alike; the per-step time is the median over rounds after
warm-up. Reported: ms/step, the speed-up compiled/eager of each optimizer, and how many times
dynamo compiled the model's forward over the whole run — DoPr's hooks toggle between recording
and not (every ``cov_every`` steps), which must give a fixed number of graphs, not one per step.

    python benchmarks/compile_speedup.py            # the table in docs/benchmark.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from beyondloss.optim import DoPr


def make_mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))


class Trainee:
    def __init__(self, name: str, d: int, batch: int, compiled: bool) -> None:
        self.name = f"{name} {'compiled' if compiled else 'eager'}"
        self.model = make_mlp(d)
        self.optimizer = DoPr(self.model, lr=1e-4, activation_preconditioning=name == "dopr-adamw")
        self.forward = torch.compile(self.model) if compiled else self.model
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, d, generator=generator)
        self.y = torch.randn(batch, d, generator=generator)
        self.times: list[float] = []

    def round(self, steps: int) -> None:
        began = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad()
            nn.functional.mse_loss(self.forward(self.x), self.y).backward()
            self.optimizer.step()
        self.times.append((time.perf_counter() - began) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps (compilation)")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; MLP of 3 {args.dim}×{args.dim} Linear "
        f"layers, batch {args.batch}; median of {args.rounds} rounds × {args.steps} steps after "
        f"{args.warmup} warm-up steps\n"
    )
    torch._dynamo.reset()
    trainees = [
        Trainee(name, args.dim, args.batch, compiled)
        for name in ("adamw", "dopr-adamw")
        for compiled in (False, True)
    ]
    frames = {}
    for trainee in trainees:
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        trainee.round(args.warmup)
        for _ in range(args.rounds):
            trainee.round(args.steps)
        frames[trainee.name] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        trainee.times.clear()
    for _ in range(args.rounds):
        for trainee in trainees:
            trainee.round(args.steps)
    print("| optimizer | eager ms/step | compiled ms/step | speed-up | graphs compiled |")
    print("|---|---|---|---|---|")
    for eager, compiled in zip(trainees[::2], trainees[1::2], strict=True):
        t_eager, t_compiled = (statistics.median(t.times) for t in (eager, compiled))
        name = eager.name.removesuffix(" eager")
        steps = args.warmup + 2 * args.rounds * args.steps
        print(
            f"| {name} | {1e3 * t_eager:.2f} | {1e3 * t_compiled:.2f} "
            f"| {t_eager / t_compiled:.2f} | {frames[compiled.name]} in {steps} steps |",
            flush=True,
        )


if __name__ == "__main__":
    main()
