"""Wall-time overhead of the post-hoc tracker inside the training loop, on the digits study.

Trains the digits model of ``beyondloss posthoc digits`` (40 % symmetric noise) twice in one
process, with identical seeds: once with no evaluator, once with the ``PosthocTracker`` the
study uses (base + SWA from epoch 1, logits of val and test stored per epoch). Rounds of
``--epochs`` epochs alternate between the two so machine noise hits both alike; the overhead
is (tracked − plain) / plain of the median round.

    python benchmarks/tracker_overhead.py            # the figure in docs/posthoc.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from beyondloss.optim import make_optimizer
from beyondloss.posthoc.tracker import PosthocTracker
from beyondloss.tasks.noisy_labels import DIGITS, cross_entropy
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main()
