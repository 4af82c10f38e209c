"""Does pretraining help the ``sft`` task? Fine-tune the pretrained model and a freshly
initialised one with the same budget (the task's epochs and batch size, AdamW at one learning
rate, no weight decay), seeds 0..S-1, and print the test metrics as a markdown table.

    python experiments/sft_pretraining.py --size quick --lr 1e-3 --seeds 3

Seeds vary the fine-tuning data order (and the scratch model's initialisation); every pretrained
run starts from the same weights. Also prints the pretraining's wall time (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from beyondloss.tasks.finetuning import FinetuningConfig, FinetuningTask, pretrained_model
from beyondloss.tasks.text import INSTRUCTIONS
from beyondloss.train import TrainConfig, train


def fine_tune(task: FinetuningTask, lr: float, seed: int) -> dict[str, float]:
    """Test metrics after fine-tuning ``task``'s model with AdamW at ``lr``, data order ``seed``."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    config = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, seed=seed)
    train(model, optimizer, task.splits().train, task.loss, config, progress=False)
    return task.evaluate(model, "test")


def summary(values: list[float]) -> str:
    """``mean ± sample standard deviation`` (the value alone for one run)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("quick", "full"), default="quick")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = FinetuningConfig.quick() if args.size == "quick" else FinetuningConfig.full()
    start = time.perf_counter()
    pretrained_model(config)
    print(f"pretraining: {time.perf_counter() - start:.1f} s")
    columns = ["exact_match", "token_accuracy"]
    columns += [f"exact_match@{name}" for name in INSTRUCTIONS]
    columns += [f"exact_match@len{n}" for n in (config.min_length, config.max_length)]
    print(f"\n| init | {' | '.join(columns)} |\n|---|{'--:|' * len(columns)}")
    for pretrained in (True, False):
        task = FinetuningTask(replace(config, pretrained=pretrained))
        runs = [fine_tune(task, args.lr, seed) for seed in range(args.seeds)]
        cells = [summary([run[column] for run in runs]) for column in columns]
        print(f"| {'pretrained' if pretrained else 'scratch'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
