"""Track a model and its weight averages along training by their logits on val and test.

:class:`PosthocTracker` is called once per epoch with the current model, either by the
training loop as an evaluator (``evaluator(model, epoch) -> metrics``) or by hand in any loop.
Each call

1. folds the model's weights into the SWA and EMA averages (BatchNorm statistics recomputed,
   see :mod:`beyondloss.posthoc.averaging`),
2. computes the logits of every tracked model ("kind") on the val and test inputs and stores
   them as float16 on the CPU, and
3. returns the untransformed metrics of every kind (a flat ``{name: float}``).

Kinds are ``"base"`` (the model itself), ``"swa"`` and ``"ema<decay>"`` (e.g. ``"ema0.9"``).
Before its ``start_epoch`` an average holds no snapshot; its logits are then those of the base
model (the averaged model equals the running model until averaging starts, as in the usual
SWA schedule).

Temperature scaling and ensembling act on logits only, so the stored logits are all that
selection needs (:mod:`beyondloss.selection`). Memory: ``2 · (N_val + N_test) · C`` bytes per
kind and epoch. Weights are kept sparingly: the current averages always (they are needed to go
on averaging), per-epoch states only with ``keep_states=True`` (in memory) or ``state_dir``
(one file per kind and epoch). With either, :meth:`PosthocTracker.rebuild` returns the model
of any kind at any tracked epoch; without, the average at epoch ``t`` is rebuilt by replaying
the end-of-epoch checkpoints ``start_epoch..t`` through a fresh :class:`SWA` / :class:`EMA`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from beyondloss.metrics.classification import StackedMetrics, classification_metrics
from beyondloss.posthoc.averaging import EMA, SWA, WeightAverage, ema_kind

SPLITS = ("val", "test")
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class EvalSplit:
    """Inputs ``(N, ...)``, observed (possibly noisy) labels ``(N,)`` and optionally clean
    labels ``(N,)`` of one evaluation split; selection uses the observed labels."""

    inputs: Tensor
    labels: Tensor
    clean_labels: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        for name, y in (("labels", self.labels), ("clean_labels", self.clean_labels)):
            if y is not None and y.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> EvalSplit:
        """Stack a map-style dataset of ``(x, y)`` or ``(x, y, y_clean)`` items."""
        items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        columns = list(zip(*items, strict=True))
        if len(columns) not in (2, 3):
            raise ValueError(f"items must be (x, y) or (x, y, y_clean), got {len(columns)}-tuples")
        inputs = torch.stack([torch.as_tensor(x) for x in columns[0]])
        labels = [torch.as_tensor(c, dtype=torch.long) for c in columns[1:]]
        return cls(inputs, *labels)


class PosthocLog:
    """Per-epoch float16 logits of every kind on every split, with the labels.

    ``logits(kind, split)`` is ``(E, N_split, C)`` over the ``E`` tracked epochs
    (:attr:`epochs`, ascending).
    """

    def __init__(
        self,
        kinds: Sequence[str],
        labels: Mapping[str, Tensor],
        clean_labels: Mapping[str, Tensor | None],
    ) -> None:
        self.kinds = tuple(kinds)
        self.splits = tuple(labels)
        self._labels = {s: labels[s].to("cpu", torch.long) for s in self.splits}
        self._clean = {
            s: None if clean_labels.get(s) is None else clean_labels[s].to("cpu", torch.long)
            for s in self.splits
        }
        self.epochs: list[int] = []
        self._logits: dict[tuple[str, str], list[Tensor]] = {
            (k, s): [] for k in self.kinds for s in self.splits
        }
        self._stacked: tuple[list[str], StackedMetrics] | None = None

    def append(self, epoch: int, logits: Mapping[tuple[str, str], Tensor]) -> None:
        """Add one epoch: ``logits[(kind, split)]`` is ``(N_split, C)``, stored as float16."""
        if self.epochs and epoch <= self.epochs[-1]:
            raise ValueError(f"epoch {epoch} is not after the last logged epoch {self.epochs[-1]}")
        if set(logits) != set(self._logits):
            raise ValueError(f"expected logits for {sorted(self._logits)}, got {sorted(logits)}")
        for key, z in logits.items():
            z = z.detach().float().clamp(-FLOAT16_MAX, FLOAT16_MAX)
            self._logits[key].append(z.to("cpu", torch.float16))
        self.epochs.append(int(epoch))

    def logits(self, kind: str, split: str) -> Tensor:
        """Stored logits ``(E, N_split, C)``, float16."""
        if (kind, split) not in self._logits:
            raise KeyError(f"no logits for kind {kind!r} on split {split!r}")
        if not self.epochs:
            raise ValueError("no epoch logged yet")
        return torch.stack(self._logits[(kind, split)])

    def logits_at(self, kind: str, split: str, index: int) -> Tensor:
        """Stored logits ``(N_split, C)`` (float16) at the ``index``-th logged epoch."""
        return self._logits[(kind, split)][index]

    def labels(self, split: str, clean: bool = False) -> Tensor:
        """Observed labels ``(N_split,)`` of ``split``, or its clean labels (``KeyError`` if
        none were given)."""
        y = self._clean[split] if clean else self._labels[split]
        if y is None:
            raise KeyError(f"no clean labels for split {split!r}")
        return y

    def has_clean(self, split: str) -> bool:
        """Whether clean labels of ``split`` are known."""
        return self._clean[split] is not None

    def metrics(self, kind: str, split: str, clean: bool = False) -> dict[str, np.ndarray]:
        """Untransformed metric curves ``{metric: (E,)}`` of ``kind`` on ``split``."""
        y = self.labels(split, clean)
        rows = [classification_metrics(z, y) for z in self._logits[(kind, split)]]
        return {m: np.array([r[m] for r in rows]) for m in rows[0]} if rows else {}

    def metrics_at(self, index: int) -> dict[str, float]:
        """Untransformed metrics of every kind at the ``index``-th logged epoch, keyed
        ``"{kind}/{split}_{metric}"`` and, with clean labels, ``"{kind}/{split}_clean_{metric}"``.
        """
        if self._stacked is None:  # the pairs' layout never changes: build it once
            keys = list(self._logits)
            pairs = [
                (f"{kind}/{split}{suffix}", position, self.labels(split, clean))
                for position, (kind, split) in enumerate(keys)
                for suffix, clean in [("", False), ("_clean", True)][: 1 + self.has_clean(split)]
            ]
            rows = [self._labels[split].shape[0] for _, split in keys]
            layout = StackedMetrics(rows, [p for _, p, _ in pairs], [y for *_, y in pairs])
            self._stacked = ([name for name, _, _ in pairs], layout)
        names, layout = self._stacked
        values = layout([stored[index] for stored in self._logits.values()])
        return {
            f"{prefix}_{metric}": value
            for prefix, metrics in zip(names, values, strict=True)
            for metric, value in metrics.items()
        }

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat ``{name: Tensor}`` form (what :meth:`save` writes)."""
        out = {"epochs": torch.tensor(self.epochs, dtype=torch.long)}
        out.update({f"kind/{k}": torch.empty(0) for k in self.kinds})
        for s in self.splits:
            out[f"labels/{s}"] = self._labels[s]
            if self._clean[s] is not None:
                out[f"clean_labels/{s}"] = self._clean[s]
        if self.epochs:
            for k, s in self._logits:
                out[f"logits/{k}/{s}"] = self.logits(k, s)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> PosthocLog:
        """Inverse of :meth:`to_tensors` (other keys are ignored)."""
        splits = [k.split("/", 1)[1] for k in tensors if k.startswith("labels/")]
        kinds = [k.split("/", 1)[1] for k in tensors if k.startswith("kind/")]
        log = cls(
            kinds,
            {s: tensors[f"labels/{s}"] for s in splits},
            {s: tensors.get(f"clean_labels/{s}") for s in splits},
        )
        log.epochs = [int(e) for e in tensors["epochs"].tolist()]
        for k in kinds:
            for s in splits:
                if log.epochs:
                    log._logits[(k, s)] = list(tensors[f"logits/{k}/{s}"].unbind(0))
        return log

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the log with :func:`torch.save` (tensors only), atomically."""
        _atomic_save(self.to_tensors(), Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PosthocLog:
        """Read a file written by :meth:`save` or :meth:`PosthocTracker.save`."""
        return cls.from_tensors(torch.load(path, map_location="cpu", weights_only=True))


def _atomic_save(obj: Mapping[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(obj), tmp)
    os.replace(tmp, path)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class PosthocTracker:
    """Per-epoch logits of the base model, its SWA and its EMAs on val and test.

    Parameters
    ----------
    val, test:
        The evaluation splits (:class:`EvalSplit`); temperatures and selection use ``val``.
    swa_start:
        First epoch in the SWA (uniform average of end-of-epoch weights ``swa_start..t``);
        ``None`` disables SWA. The default 1 averages all epochs of the 1-based training loop.
    ema_decays:
        One EMA of end-of-epoch weights per decay (per-epoch decay, in [0, 1)), starting at
        ``swa_start`` (or the first epoch when SWA is disabled).
    bn_loader:
        Batches of training inputs for recomputing BatchNorm statistics of the averages;
        required when the model has BatchNorm layers.
    batch_size:
        Inputs per forward pass when computing logits.
    keep_states:
        Keep every kind's weights at every epoch in CPU memory (for :meth:`rebuild`).
    state_dir:
        Instead (or as well), write them to ``state_dir/{kind}_epoch{epoch:04d}.pt``.

    The tracker is an evaluator: ``tracker(model, epoch)`` returns
    ``{"{kind}/{split}_{metric}": value}`` (plus ``"{kind}/{split}_clean_{metric}"`` when clean
    labels are known) for metrics error, nll, ece, brier. Epochs must increase from call to
    call; after a crash, restore with :meth:`load` from the file saved with the checkpoint the
    loop resumes from.
    """

    def __init__(
        self,
        val: EvalSplit,
        test: EvalSplit,
        swa_start: int | None = 1,
        ema_decays: Sequence[float] = (),
        bn_loader: Iterable[Any] | None = None,
        batch_size: int = 1024,
        keep_states: bool = False,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kinds_of_ema = [ema_kind(d) for d in ema_decays]
        if len(set(kinds_of_ema)) != len(kinds_of_ema):
            raise ValueError(f"ema_decays must be distinct, got {list(ema_decays)}")
        self.splits = {"val": val, "test": test}
        self.swa_start = swa_start
        self.ema_decays = tuple(float(d) for d in ema_decays)
        self.batch_size = batch_size
        self.keep_states = keep_states
        self.state_dir = None if state_dir is None else Path(state_dir)
        start = 0 if swa_start is None else swa_start
        self.averages: dict[str, WeightAverage] = {}
        if swa_start is not None:
            self.averages["swa"] = SWA(swa_start, bn_loader)
        for decay, kind in zip(self.ema_decays, kinds_of_ema, strict=True):
            self.averages[kind] = EMA(decay, start, bn_loader)
        self.log = PosthocLog(
            ["base", *self.averages],
            {s: e.labels for s, e in self.splits.items()},
            {s: e.clean_labels for s, e in self.splits.items()},
        )
        self.states: dict[int, dict[str, dict[str, Tensor]]] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    @property
    def kinds(self) -> tuple[str, ...]:
        """Tracked kinds: ``"base"``, then ``"swa"`` and the EMAs that are enabled."""
        return self.log.kinds

    @property
    def epochs(self) -> list[int]:
        """Tracked epochs, ascending."""
        return self.log.epochs

    def logits(self, kind: str, split: str) -> Tensor:
        """Stored logits ``(E, N_split, C)`` (float16) of ``kind`` on ``split``."""
        return self.log.logits(kind, split)

    def update(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Average, evaluate and log ``model`` at the end of ``epoch``; returns the metrics."""
        if self.log.epochs and epoch <= self.log.epochs[-1]:
            raise ValueError(
                f"epoch {epoch} already tracked (last is {self.log.epochs[-1]}); restore the "
                "tracker saved with the checkpoint training resumed from"
            )
        models: dict[str, nn.Module] = {"base": model}
        for kind, average in self.averages.items():
            if kind in self._pending:
                average.load_state_dict(self._pending.pop(kind), template=model)
            average.update(model, epoch)
            models[kind] = average.module if average.n_averaged else model
        logits = {
            (kind, split): split_logits
            for kind, network in models.items()
            for split, split_logits in self._predict(network).items()
        }
        self.log.append(epoch, logits)
        self._keep(epoch, models)
        return self.log.metrics_at(-1)

    __call__ = update

    def _predict(self, model: nn.Module) -> dict[str, Tensor]:
        """Logits ``(N, C)`` of ``model`` on every split, in eval mode (switched once for all
        splits), computed in batches on its device."""
        device = next(iter(model.parameters()), torch.empty(0)).device
        was_training = model.training
        model.eval()
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for split in SPLITS:
                inputs = self.splits[split].inputs
                if inputs.shape[0] <= self.batch_size:  # one pass, no slicing or concatenation
                    out[split] = model(inputs.to(device))
                    continue
                out[split] = torch.cat(
                    [
                        model(inputs[i : i + self.batch_size].to(device))
                        for i in range(0, inputs.shape[0], self.batch_size)
                    ]
                )
        model.train(was_training)
        return out

    def _keep(self, epoch: int, models: Mapping[str, nn.Module]) -> None:
        if not (self.keep_states or self.state_dir):
            return
        states = {kind: _cpu_state(m) for kind, m in models.items()}
        if self.keep_states:
            self.states[epoch] = states
        if self.state_dir is not None:
            for kind, state in states.items():
                _atomic_save(state, self.state_dir / f"{kind}_epoch{epoch:04d}.pt")

    def state(self, kind: str, epoch: int) -> dict[str, Tensor]:
        """State dict of ``kind`` at ``epoch`` from memory or ``state_dir``; the current
        averages are always available at the last tracked epoch."""
        if epoch in self.states:
            return self.states[epoch][kind]
        if self.state_dir is not None and (self.state_dir / f"{kind}_epoch{epoch:04d}.pt").exists():
            path = self.state_dir / f"{kind}_epoch{epoch:04d}.pt"
            return torch.load(path, map_location="cpu", weights_only=True)
        if kind in self.averages and self.log.epochs and epoch == self.log.epochs[-1]:
            average = self.averages[kind]
            if average.n_averaged:
                return _cpu_state(average.module)
        raise KeyError(
            f"no weights of {kind!r} at epoch {epoch}: use keep_states=True or state_dir, or "
            "replay the saved checkpoints through a fresh SWA/EMA"
        )

    def rebuild(self, kind: str, epoch: int, template: nn.Module) -> nn.Module:
        """A copy of ``template`` holding the weights of ``kind`` at ``epoch``, in eval mode."""
        model = copy.deepcopy(template)
        model.load_state_dict(self.state(kind, epoch))
        return model.eval()

    def state_dict(self) -> dict[str, Tensor]:
        """Logs, current averages and in-memory states as a flat ``{name: Tensor}`` (what
        :meth:`save` writes). The training loop stores it in every checkpoint, so a killed run
        resumes with its logits and averages (:meth:`load_state_dict`)."""
        out = self.log.to_tensors()
        for kind, average in self.averages.items():
            state = self._pending.get(kind) or average.state_dict()
            out[f"n_averaged/{kind}"] = torch.tensor(state["n_averaged"])
            for name, value in (state["module"] or {}).items():
                out[f"average/{kind}/{name}"] = value.detach().cpu()
        for epoch, states in self.states.items():
            for kind, state in states.items():
                out.update({f"kept/{epoch}/{kind}/{n}": v for n, v in state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module | None = None) -> None:
        """Restore a tracker built with the same arguments from :meth:`state_dict`, to go on
        tracking. The averages are rebuilt on ``model`` (a template of the architecture), or
        from the next model passed to :meth:`update` when ``None``."""
        log = PosthocLog.from_tensors(state)
        if log.kinds != self.kinds:
            raise ValueError(f"state tracks kinds {log.kinds}, this tracker {self.kinds}")
        self.log = log
        self._pending = {}
        for kind, average in self.averages.items():
            prefix = f"average/{kind}/"
            module = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            n = int(state[f"n_averaged/{kind}"])
            self._pending[kind] = {"module": module if n else None, "n_averaged": n}
            if model is not None:
                average.load_state_dict(self._pending.pop(kind), template=model)
        self.states = {}
        for key, value in state.items():
            if key.startswith("kept/"):
                _, epoch, kind, name = key.split("/", 3)
                self.states.setdefault(int(epoch), {}).setdefault(kind, {})[name] = value

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` with :func:`torch.save`, atomically."""
        _atomic_save(self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore from :meth:`save`'s file (see :meth:`load_state_dict`; the averages are
        rebuilt from the next model passed to :meth:`update`)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
