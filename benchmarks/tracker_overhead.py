"""Wall-time overhead of the post-hoc tracker inside the training loop, on the digits study.

Trains the digits model of ``beyondloss posthoc digits`` (40 % symmetric noise) twice in one
process, with identical seeds: once with no evaluator, once with the ``PosthocTracker`` the
study uses (base + SWA from epoch 1, logits of val and test stored per epoch). Rounds of
``--epochs`` epochs alternate between the two so machine noise hits both alike; the overhead
is (tracked − plain) / plain of the median round.

    python benchmarks/tracker_overhead.py            # the figures in docs/posthoc.md
    python benchmarks/tracker_overhead.py --parts --epochs 40   # each part of an update

It also measures the tracker against its floor, the work it cannot avoid: per epoch, the SWA
update and the forward passes of the base and the SWA model over val and test. The tracker and
the floor alternate on the same model, epoch after epoch; the figure is the ratio of their
median per-epoch CPU times of this process (``time.process_time``, one thread), so that other
work on the machine does not stretch one side more than the other; the ratio of the fastest
epochs is printed too, as the figure least disturbed by a busy machine, and so is the median of
the per-epoch ratios (tracker and floor of the same epoch, run back to back), which a slow drift
of the machine's load moves least.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from beyondloss.optim import make_optimizer
from beyondloss.posthoc.averaging import SWA
from beyondloss.posthoc.tracker import PosthocTracker
from beyondloss.tasks.noisy_labels import DIGITS, NoisyLabelData, cross_entropy
from beyondloss.train import TrainConfig, train


def one_round(tracked: bool, epochs: int) -> float:
    """Seconds to train the digits model for ``epochs`` epochs, with or without the tracker."""
    data = DIGITS.build(0.4, "symmetric")
    torch.manual_seed(0)
    model = DIGITS.make_model(data.n_features, data.n_classes)
    optimizer = make_optimizer(DIGITS.optimizer, model, DIGITS.lr, DIGITS.weight_decay)
    evaluators = [PosthocTracker(data.val, data.test, swa_start=1)] if tracked else []
    config = TrainConfig(epochs=epochs, batch_size=DIGITS.batch_size, seed=0)
    began = time.perf_counter()
    train(model, optimizer, data.train, cross_entropy, config, evaluators, progress=False)
    return time.perf_counter() - began


def digits_setup() -> tuple[NoisyLabelData, nn.Module, PosthocTracker]:
    """The digits study's data, a fresh model (seed 0) and its tracker (base + SWA)."""
    data = DIGITS.build(0.4, "symmetric")
    torch.manual_seed(0)
    model = DIGITS.make_model(data.n_features, data.n_classes)
    return data, model, PosthocTracker(data.val, data.test, swa_start=1)


def perturb(model: nn.Module) -> None:
    """Stand-in for a training epoch: a small random change of every weight."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=1e-3)


def floor_times(epochs: int) -> dict[str, list[float]]:
    """Per-epoch CPU seconds of ``PosthocTracker.update`` and of its floor (see above),
    ``{"tracker": [...], "floor": [...]}``.

    The two take turns going first, so that neither always runs on the caches the other warmed.
    """
    data, model, tracker = digits_setup()
    average = SWA(start_epoch=1)

    def floor_work(epoch: int) -> None:
        average.update(model, epoch)
        with torch.no_grad():
            for network in (model, average.module):
                network.eval()
                for split in (data.val, data.test):
                    network(split.inputs)
                network.train()

    times: dict[str, list[float]] = {"tracker": [], "floor": []}
    for epoch in range(1, epochs + 1):
        perturb(model)
        turns = [("tracker", tracker.update), ("floor", floor_work)]
        for name, work in turns if epoch % 2 else turns[::-1]:
            began = time.process_time()
            work(model, epoch) if name == "tracker" else work(epoch)
            times[name].append(time.process_time() - began)
    return times


def part_times(epochs: int) -> dict[str, list[float]]:
    """Per-epoch CPU seconds of each part of ``PosthocTracker.update`` inside the epoch loop:
    the SWA update, the forwards of one model over val and test (``_predict``, twice an
    epoch), the float16 bookkeeping (``append``) and the metrics (``metrics_at``)."""
    data, model, tracker = digits_setup()
    times: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            began = time.process_time()
            result = work(*args)
            times.setdefault(name, []).append(time.process_time() - began)
            return result

        return run

    tracker.averages["swa"].update = timed("SWA update", tracker.averages["swa"].update)
    tracker._predict = timed("forwards of one model (_predict)", tracker._predict)
    tracker.log.append = timed("float16 bookkeeping (append)", tracker.log.append)
    tracker.log.metrics_at = timed("metrics (metrics_at)", tracker.log.metrics_at)
    update = timed("whole update", tracker.update)
    for epoch in range(1, epochs + 1):
        perturb(model)
        update(model, epoch)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--parts", action="store_true", help="only time each part of the tracker's update"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.parts:
        for name, seconds in part_times(10 * args.epochs).items():
            print(f"{name}: median {1e3 * statistics.median(seconds):.2f} ms")
        return
    plain, tracked = [], []
    for _ in range(args.rounds):
        plain.append(one_round(False, args.epochs))
        tracked.append(one_round(True, args.epochs))
    t_plain, t_tracked = statistics.median(plain), statistics.median(tracked)
    print(
        f"digits, {args.epochs} epochs per round, median of {args.rounds} rounds, 1 thread: "
        f"plain {t_plain:.2f} s, with tracker {t_tracked:.2f} s, "
        f"overhead {100 * (t_tracked - t_plain) / t_plain:.1f} %"
    )
    times = floor_times(10 * args.epochs)
    for name, of in (("median", statistics.median), ("fastest", min)):
        update, floor = of(times["tracker"]), of(times["floor"])
        print(
            f"per epoch, {name} of {10 * args.epochs}: tracker {1e3 * update:.2f} ms, floor "
            f"(SWA update + 4 forward passes) {1e3 * floor:.2f} ms, ratio {update / floor:.3f}"
        )
    paired = [t / f for t, f in zip(times["tracker"], times["floor"], strict=True)]
    low, high = (statistics.quantiles(paired, n=4)[i] for i in (0, 2))
    print(
        f"per epoch, paired: median of the {len(paired)} tracker/floor ratios of the same epoch "
        f"{statistics.median(paired):.3f} (quartiles {low:.3f}, {high:.3f})"
    )


if __name__ == "__main__":
    main()
