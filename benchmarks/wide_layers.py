"""Time and memory of DoPr on one wide layer: dense Σ against block-diagonal Σ.

A wide down-projection ``nn.Linear(d_in, d_out)`` trains on a batch of n rows. AdamW and DoPr-AdamW
(its amortized default, and with ``max_block_size`` B) each train their own copy of the same
layer on the same data in one process, in interleaved rounds (ABAB...) so that machine noise
hits all alike; the per-step time is the median over rounds. Reported per row:

* the time ratio DoPr / AdamW and its FLOP floor: with D = d_in + 1 and blocks of
  b = min(B, D), every step needs the product G·P (2·d_out·D·b flops), and every 10th step
  the statistics (2·n·D·b) and the factorization and inverse (about D·b²), against the
  6·n·d_in·d_out of forward + backward::

      floor = 1 + (2·d_out·D·b + (2·n·D·b + D·b²) / 10) / (6·n·d_in·d_out)

* the bytes of Σ and P that DoPr holds, against what the block structure predicts
  (2 matrices per block, Σ_k b_k² entries each, fp32) — they must be equal; and the memory
  ratio to AdamW (parameters, gradients and both Adam moments).

    python benchmarks/wide_layers.py                 # the table in docs/benchmark.md
    python benchmarks/wide_layers.py --dims 1024 --blocks 256,dense --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from beyondloss.optim import DoPr
from beyondloss.optim.linalg import block_bounds


class Trainee:
    """One optimizer on its own copy of the layer, and a timed step."""

    def __init__(self, d_in: int, d_out: int, n: int, block: int | None, dopr: bool) -> None:
        torch.manual_seed(0)
        self.layer = nn.Linear(d_in, d_out)
        self.block = block
        self.optimizer = DoPr(
            self.layer, lr=1e-4, activation_preconditioning=dopr, max_block_size=block
        )
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, d_in, generator=generator)
        self.y = torch.randn(n, d_out, generator=generator)
        self.times: list[float] = []

    def round(self, steps: int) -> None:
        began = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=False)
            nn.functional.mse_loss(self.layer(self.x), self.y).backward()
            self.optimizer.step()
        self.times.append((time.perf_counter() - began) / steps)

    def ap_bytes(self) -> int:
        ap = self.optimizer.preconditioner
        if ap is None:
            return 0
        state = ap.layers[""]
        tensors = [*state.sigma, *state.inverse.blocks]
        return sum(t.numel() * t.element_size() for t in tensors)

    def base_bytes(self) -> int:
        tensors = [*self.layer.parameters(), *(p.grad for p in self.layer.parameters())]
        tensors += [v for s in self.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def predicted_ap_bytes(dim: int, block: int | None) -> int:
    """Σ and P as fp32 blocks over ``block_bounds(dim, block)``."""
    return 2 * 4 * sum((stop - start) ** 2 for start, stop in block_bounds(dim, block))


def flop_floor(d_in: int, d_out: int, n: int, block: int | None, every: int = 10) -> float:
    """Step-time floor of DoPr over AdamW from FLOPs alone (see the module docstring)."""
    dim = d_in + 1
    b = dim if block is None else min(block, dim)
    extra = 2 * d_out * dim * b + (2 * n * dim * b + dim * b * b) / every
    return 1 + extra / (6 * n * d_in * d_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="1024,4096,16384", help="input widths d_in")
    parser.add_argument("--d-out", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1024, help="batch rows n")
    parser.add_argument("--blocks", default="dense,1024,256", help="max_block_size values")
    parser.add_argument("--dense-max", type=int, default=4096,
                        help="widest d_in for which dense Σ is run")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    blocks = [None if v == "dense" else int(v) for v in args.blocks.split(",")]

    print(
        f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; nn.Linear(d_in, {args.d_out}), "
        f"n = {args.rows} rows; median of {args.rounds} rounds × {args.steps} steps; "
        "DoPr at its amortized default (Σ and P every 10 steps)\n"
    )
    header = (
        "| d_in | block B | AdamW ms/step | DoPr ms/step | time ratio | FLOP floor "
        "| Σ+P MiB | predicted MiB | memory ratio to AdamW |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for d_in in dims:
        runs = [b for b in blocks if not (b is None and d_in > args.dense_max)]
        runs = [b for b in runs if b is None or b < d_in + 1]
        trainees = [Trainee(d_in, args.d_out, args.rows, None, dopr=False)]
        trainees += [Trainee(d_in, args.d_out, args.rows, b, dopr=True) for b in runs]
        for trainee in trainees:  # warm up; the first step also builds Σ and P
            trainee.round(1)
            trainee.times.clear()
        for _ in range(args.rounds):
            for trainee in trainees:
                trainee.round(args.steps)
        base, *doprs = trainees
        t_base = statistics.median(base.times)
        for trainee in doprs:
            t = statistics.median(trainee.times)
            floor = flop_floor(d_in, args.d_out, args.rows, trainee.block)
            held, predicted = trainee.ap_bytes(), predicted_ap_bytes(d_in + 1, trainee.block)
            memory = (base.base_bytes() + held) / base.base_bytes()
            label = "dense" if trainee.block is None else str(trainee.block)
            print(
                f"| {d_in} | {label} | {1e3 * t_base:.1f} | {1e3 * t:.1f} | {t / t_base:.2f} "
                f"| {floor:.2f} | {held / 2**20:.1f} "
                f"| {predicted / 2**20:.1f} | {memory:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
