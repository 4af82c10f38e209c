"""The one training loop: epochs, per-epoch evaluators, store rows, atomic checkpoints, resume.

Epoch ``e`` (1-based) runs, in order: a training pass over ``train_data`` in an order drawn
from a generator seeded by ``(config.seed, e)``; every evaluator under ``model.eval()`` and
``torch.no_grad()``; one store row per metric; an atomic checkpoint. A crash anywhere in an
epoch therefore leaves the checkpoint of the previous epoch, and the redone epoch overwrites
any store rows it had already written.

On CPU a resumed run is bitwise identical to an uninterrupted one: the checkpoint holds the
model, the optimizer, the learning-rate schedule and every global RNG state (torch, CUDA, numpy,
``random``) as they were at the end of the epoch, and the shuffling order never depends on RNG
history.

**Schedules and per-step hooks.** ``config.schedule`` and ``config.warmup`` set the learning
rate of every optimizer step (:mod:`beyondloss.schedules`: the scheduler is stepped after each
``optimizer.step()``, over ``epochs · ⌈n / batch_size⌉`` steps). An evaluator with an
``on_step(model)`` method (a :class:`StepHook`, e.g. the per-step EMA of
:class:`beyondloss.evaluation.StepAverageEvaluator`) is called after every optimizer step, on
rank 0, before the next batch.

**Data parallel.** Called on every rank of a ``torch.distributed`` process group of world size
``W > 1``, the loop trains one run on ``W`` processes: each global batch of
``config.batch_size`` samples (the same batches, in the same order, as one process draws) is
split into ``W`` contiguous shards, one per rank, and the model runs wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`. Rank ``r``'s loss is scaled by
``W n_r / n`` (``n_r`` of the batch's ``n`` samples are its own), so that DDP's mean over ranks
is the gradient of the batch's mean loss, uneven shards included: the run computes what one
process computes on the concatenated batch, up to the order of floating-point sums. (Exactly so
for a loss that is a mean over samples; one averaged over a count that varies per sample, such
as answer tokens under ``ignore_index``, gets each shard's mean weighted by its samples.) DoPr pools
its activation statistics over the ranks itself. Rank 0 alone evaluates, writes store rows and
the checkpoint, and hands each epoch's metrics to the other ranks, so every rank returns the
same history. Each rank's RNG is seeded by ``(config.seed, rank)`` (rank 0 by ``config.seed``)
and the checkpoint holds every rank's RNG state, so a run resumed on the same number of ranks
continues exactly.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Dataset, TensorDataset, default_collate
from tqdm import tqdm

from beyondloss.schedules import check_schedule, make_scheduler
from beyondloss.store import ResultsStore

Evaluator = Callable[[nn.Module, int], Mapping[str, float]]
"""``(model, epoch) -> metrics``: called after each epoch's training pass, 1-based epoch."""

LossFn = Callable[[nn.Module, Any], Tensor]
"""``(model, batch) -> scalar loss`` averaged over the batch; moves the batch to the model's
device itself. ``batch`` is the ``default_collate`` of the dataset's items."""

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the checkpoint inside a run directory."""

_LOOP_METRICS = frozenset({"epoch", "train_loss", "epoch_seconds"})


@runtime_checkable
class StepHook(Protocol):
    """An evaluator that also acts after every optimizer step (``model`` is the unwrapped
    model, its weights just updated)."""

    def on_step(self, model: nn.Module) -> None: ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the loop itself (the optimizer's live in the optimizer).

    Attributes
    ----------
    epochs:
        Number of passes over the training data; epochs are numbered ``1..epochs``.
    batch_size:
        Samples per optimizer step; the last batch of an epoch may be smaller.
    seed:
        Seeds the global RNGs of a fresh run and each epoch's shuffling order.
    grad_clip:
        Maximum total 2-norm of the *raw* gradient per step (``clip_grad_norm_`` before
        ``optimizer.step()``), or ``None`` for no clipping. DoPr's activation preconditioner
        acts after it and may enlarge the gradient; ``DoPr(..., max_grad_norm=c)`` clips the
        preconditioned gradient instead.
    schedule:
        Learning-rate schedule, one of :data:`beyondloss.schedules.SCHEDULES`: ``"constant"``,
        ``"cosine"`` or ``"linear"`` decay after the warmup, stepped per optimizer step.
    warmup:
        Fraction of the run's optimizer steps spent warming the learning rate up linearly,
        in ``[0, 1)``.
    """

    epochs: int
    batch_size: int
    seed: int = 0
    grad_clip: float | None = None
    schedule: str = "constant"
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        check_schedule(self.schedule, self.warmup)

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes over the run (a schedule or a warmup)."""
        return self.schedule != "constant" or self.warmup > 0


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Dataset,
    loss_fn: LossFn,
    config: TrainConfig,
    evaluators: Sequence[Evaluator] = (),
    run_dir: Path | None = None,
    store: ResultsStore | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` for ``config.epochs`` epochs and return the per-epoch history.

    Each history entry holds ``epoch``, ``train_loss`` (mean one-step loss over the epoch's
    samples, weighted by batch size), ``epoch_seconds`` (wall time of training plus evaluation)
    and every evaluator's metrics; two sources giving the same name raise ``ValueError``.

    With ``run_dir``, a checkpoint ``run_dir/checkpoint.pt`` is written atomically after every
    epoch, and if one is already there training resumes after its epoch (the returned history
    then includes the epochs before the resume). ``model`` and ``optimizer`` must be built the
    same way as in the interrupted run. A fresh run seeds ``torch``, ``numpy`` and ``random``
    with ``config.seed``.

    With ``store`` and ``run_id`` (both or neither; the run must already be registered with
    :meth:`ResultsStore.add_run`), every epoch's metrics are logged and the run is marked
    complete at the end; with ``run_dir`` too, the final checkpoint is first registered as the
    run's ``checkpoint`` artifact (:meth:`ResultsStore.add_artifact`). ``progress`` shows a
    tqdm bar over epochs when stderr is a terminal.
    """
    if (store is None) != (run_id is None):
        raise ValueError("store and run_id must be given together")
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    rank, world = _rank_and_world()
    if world > 1:
        _check_shardable(len(train_data), config.batch_size, world)
    history: list[dict[str, float]] = []
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    scheduler = (
        make_scheduler(optimizer, config.schedule, config.warmup, config.epochs * steps_per_epoch)
        if config.scheduled
        else None
    )
    checkpoint = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    if checkpoint is not None and checkpoint.exists():
        history = _resume(checkpoint, model, optimizer, config, evaluators, scheduler)
    else:
        _seed_everything(_rank_seed(config.seed, rank))
    start = len(history)
    net = _data_parallel(model) if world > 1 else model
    writes = rank == 0
    hooks = [e for e in evaluators if isinstance(e, StepHook)] if writes else []

    def after_step() -> None:
        if scheduler is not None:
            scheduler.step()
        for hook in hooks:
            hook.on_step(model)

    bar = tqdm(
        range(start + 1, config.epochs + 1),
        initial=start,
        total=config.epochs,
        unit="epoch",
        disable=not (progress and writes and sys.stderr.isatty()),
    )
    for epoch in bar:
        began = time.perf_counter()
        train_loss = _train_epoch(net, optimizer, train_data, loss_fn, config, epoch, after_step)
        record = {"epoch": float(epoch), "train_loss": train_loss}
        model.eval()
        if writes:
            record |= _evaluate(evaluators, model, epoch, record.keys())
            record["epoch_seconds"] = time.perf_counter() - began
        if world > 1:
            record = _from_rank_zero(record)
        history.append(record)
        if store is not None and run_id is not None and writes:
            store.log_epoch(run_id, epoch, {k: v for k, v in record.items() if k != "epoch"})
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint, model, optimizer, config, history, evaluators, scheduler
            )
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
    bar.close()

    if store is not None and run_id is not None and writes:
        if checkpoint is not None and history:
            contents = checkpoint_contents(evaluators)
            store.add_artifact(run_id, "checkpoint", checkpoint, len(history), contents)
        store.mark_complete(run_id)
    return history


def _evaluate(
    evaluators: Sequence[Evaluator], model: nn.Module, epoch: int, taken: Iterable[str]
) -> dict[str, float]:
    """Every evaluator's metrics at ``epoch`` under ``torch.no_grad()``; a name given twice (by
    two evaluators, or one of ``taken`` or the loop's own) raises ``ValueError``."""
    metrics: dict[str, float] = {}
    taken = set(taken) | _LOOP_METRICS
    for evaluator in evaluators:
        with torch.no_grad():
            values = evaluator(model, epoch)
        clash = set(values) & (taken | metrics.keys())
        if clash:
            raise ValueError(f"metric names {sorted(clash)} given twice at epoch {epoch}")
        metrics.update({name: float(value) for name, value in values.items()})
    return metrics


def checkpoint_contents(evaluators: Sequence[Evaluator] = ()) -> list[str]:
    """What a checkpoint of :func:`train` holds, as its artifact records it: ``model``,
    ``optimizer``, ``rng``, ``history`` and ``evaluator:<name>`` per checkpointable evaluator."""
    return ["model", "optimizer", "rng", "history"] + [
        f"evaluator:{getattr(evaluator, 'name', type(evaluator).__name__)}"
        for evaluator in evaluators
        if hasattr(evaluator, "state_dict")
    ]


def loss_evaluator(
    loss_fn: LossFn, dataset: Dataset, name: str = "val_loss", batch_size: int = 512
) -> Evaluator:
    """Evaluator returning ``{name: mean one-step loss over dataset}``, weighted by batch size.

    ``dataset`` is read in order in batches of ``batch_size`` samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch, size in _batches(dataset, range(len(dataset)), batch_size):
                total += loss_fn(model, batch).item() * size
                count += size
        return {name: total / count}

    return evaluate


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    loss_fn: LossFn,
    config: TrainConfig,
    epoch: int,
    after_step: Callable[[], None] = lambda: None,
) -> float:
    """One pass over ``data`` in this epoch's order; returns the sample-weighted mean loss.
    ``after_step`` runs after every optimizer step (the schedule, the step hooks).

    On rank ``r`` of ``W > 1`` ranks (``model`` is then the DDP wrapper) each batch of ``n``
    samples contributes its shard of ``n_r`` (:func:`_shard`), with the loss scaled by
    ``W n_r / n``; the epoch's loss is summed over the ranks."""
    model.train()
    rank, world = _rank_and_world()
    order = _epoch_order(len(data), config.seed, epoch)
    total: Tensor | float = 0.0
    count = 0
    for indices in _chunks(order, config.batch_size):
        shard = _shard(indices, rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, _collate(data, shard))
        (loss * (world * len(shard) / len(indices)) if world > 1 else loss).backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        after_step()
        total = total + loss.detach().double() * len(shard)
        count += len(indices)
    if world > 1:
        total = torch.as_tensor(total, dtype=torch.float64)
        dist.all_reduce(total)
    return float(total) / count


def _rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_shardable(n: int, batch_size: int, world: int) -> None:
    """Every batch must give each of ``world`` ranks at least one sample; the last batch is
    the smallest (all of ``n`` when ``n < batch_size``)."""
    last = n % batch_size or batch_size
    if last < world:
        raise ValueError(
            f"{world} ranks need at least {world} samples in every batch; batch_size="
            f"{batch_size} over {n} samples leaves a batch of {last}"
        )


def _shard(indices: Sequence[int], rank: int, world: int) -> Sequence[int]:
    """Rank ``rank``'s contiguous part of ``indices`` split into ``world`` parts whose sizes
    differ by at most one (the first ``len % world`` parts are one larger)."""
    if world == 1:
        return indices
    base, extra = divmod(len(indices), world)
    begin = rank * base + min(rank, extra)
    return indices[begin : begin + base + (rank < extra)]


def _rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank``: ``seed`` itself on rank 0 (one process seeds as before), one
    drawn from ``(seed, rank)`` elsewhere, so that ranks draw independent noise."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence((seed, rank)).generate_state(1)[0])


def _data_parallel(model: nn.Module) -> DistributedDataParallel:
    """``model`` wrapped for gradient averaging over the ranks (on its parameters' device)."""
    first = next(model.parameters())
    return DistributedDataParallel(model, device_ids=[first.device] if first.is_cuda else None)


def _from_rank_zero(record: dict[str, float]) -> dict[str, float]:
    """Rank 0's ``record`` on every rank."""
    box = [record]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    mixed = np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(mixed))
    return torch.randperm(n, generator=generator).tolist()


def _batches(dataset: Dataset, order: Sequence[int], batch_size: int) -> Iterator[tuple[Any, int]]:
    """``(collated batch, number of samples)`` for consecutive chunks of ``order``.

    A ``TensorDataset`` is sliced with one index tensor per batch (same result as collating its
    items one by one, without the per-item Python overhead).
    """
    for indices in _chunks(order, batch_size):
        yield _collate(dataset, indices), len(indices)


def _chunks(order: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    """Consecutive chunks of ``batch_size`` indices of ``order`` (the last may be shorter)."""
    for begin in range(0, len(order), batch_size):
        yield order[begin : begin + batch_size]


def _collate(dataset: Dataset, indices: Sequence[int]) -> Any:
    """The batch of ``dataset``'s items at ``indices``."""
    if isinstance(dataset, TensorDataset):
        index = torch.as_tensor(indices)
        return [tensor[index] for tensor in dataset.tensors]
    return default_collate([dataset[i] for i in indices])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain values that ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    history: list[dict[str, float]],
    evaluators: Sequence[Evaluator] = (),
    scheduler: LRScheduler | None = None,
) -> None:
    """Write the checkpoint to a temporary file, fsync it, then rename it over ``path``.

    It holds the state of every checkpointable evaluator (one with ``state_dict``), in order.
    Under ``W > 1`` ranks every rank calls it: ``rng`` then holds the list of the ranks' RNG
    states, gathered from all of them, and rank 0 alone writes.
    """
    rank, world = _rank_and_world()
    rng: Any = _rng_state()
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, rng)
        rng = states
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "epoch": len(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng,
        "config": asdict(config),
        "history": history,
        "evaluators": [
            evaluator.state_dict() if hasattr(evaluator, "state_dict") else None
            for evaluator in evaluators
        ],
    }
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    evaluators: Sequence[Evaluator] = (),
    scheduler: LRScheduler | None = None,
) -> list[dict[str, float]]:
    """Load the checkpoint into ``model``, ``optimizer``, the schedule, the checkpointable
    evaluators and the RNGs; return its history.

    Raises ``ValueError`` if the checkpoint was written under a different batch size, seed,
    gradient clip, schedule, warmup or number of ranks (or, with a schedule, another number of
    epochs, which sets the schedule's length), already holds more epochs than
    ``config.epochs``, or holds evaluator state that does not match ``evaluators``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    rank, world = _rank_and_world()
    rng = payload["rng"]
    ranks = len(rng) if isinstance(rng, list) else 1
    if ranks != world:
        raise ValueError(f"checkpoint {path} was written by {ranks} ranks; this run has {world}")
    saved = {"schedule": "constant", "warmup": 0.0} | payload["config"]
    fields = ("batch_size", "seed", "grad_clip", "schedule", "warmup")
    for field in fields + (("epochs",) if config.scheduled else ()):
        if saved[field] != getattr(config, field):
            raise ValueError(
                f"checkpoint {path} has {field}={saved[field]!r}, "
                f"config has {getattr(config, field)!r}"
            )
    if payload["epoch"] > config.epochs:
        raise ValueError(
            f"checkpoint {path} is at epoch {payload['epoch']}, beyond epochs={config.epochs}"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    states = payload.get("evaluators", [None] * len(evaluators))
    stateful = [hasattr(evaluator, "state_dict") for evaluator in evaluators]
    if len(states) != len(evaluators) or stateful != [s is not None for s in states]:
        raise ValueError(
            f"checkpoint {path} holds the state of {sum(s is not None for s in states)} of "
            f"{len(states)} evaluators; this run has {sum(stateful)} of {len(evaluators)}"
        )
    for evaluator, state in zip(evaluators, states, strict=True):
        if state is not None:
            evaluator.load_state_dict(state, model)
    _set_rng_state(rng[rank] if isinstance(rng, list) else rng)
    return payload["history"]
