"""Classification under synthetic label noise: noise models, datasets, models, budgets.

Noise models
------------
Labels ``y ∈ {0..C-1}`` of shape ``(N,)`` are corrupted with rate ``r ∈ [0, 1]``; the noisy
label ``ỹ`` follows the transition matrix ``T[c, c'] = P(ỹ = c' | y = c)``:

* **symmetric**: a flipped label is replaced by a uniformly random *other* class,
  ``T = (1 − r) I + r / (C − 1) · (1 1ᵀ − I)``; a flipped label never equals the clean one.
* **class** (class-dependent, "pair flip"): a flipped label of class ``c`` becomes ``π(c)``
  for a fixed permutation ``π`` without fixed points, by default ``π(c) = (c + 1) mod C``:
  ``T = (1 − r) I + r P_π``. For ``r < 1/2`` the clean class stays the most frequent noisy
  label of its inputs; at ``r ≥ 1/2`` the noisy labels say ``π(c)`` at least as often as
  ``c``, and no classifier can recover the clean classes from them.

Flips are *exact* per class rather than Bernoulli: in each class ``c`` with ``n_c`` samples
exactly ``round(r · n_c)`` samples, chosen uniformly at random, are flipped, so the realised
rate is within ``C / (2N)`` of ``r``. Draws depend only on the seed and the clean labels, not
on ``r``: the flip order (a random permutation per class) and the replacement classes are drawn
first, so at one seed the samples flipped at 20 % are a subset of those flipped at 40 %, with
the same noisy labels.

Datasets
--------
A :class:`NoisyLabelDataset` names the inputs (a loader), the model and the training budget.
:meth:`NoisyLabelDataset.build` splits the data stratified by class into train / val / test,
standardises the inputs with the training split's per-feature mean and standard deviation, and
corrupts the labels of *every* split, each with its own seed: as in the post-hoc reversal
paper (Ranjan et al., 2024), selection and the headline test metrics use the noisy labels, and
the clean labels are kept beside them for clean-label test metrics.

Split sizes: selection compares candidates (epochs, configs) on the val split, so its val
metric must be precise enough to rank them. At error rate ``p`` the standard error of an error
estimate on ``n`` samples is ``√(p(1−p)/n)``: with 40 % symmetric noise, noisy-label val error
sits near ``p ≈ 0.45``, giving ``±2.0`` points at ``n = 600`` and ``±0.9`` at ``n = 3000``.
Candidates are compared on the *same* val samples, so their difference is much less noisy than
either value (most samples are right or wrong for both), and the test split, as large as val,
bounds what the reported gains mean. Hence:

* ``digits``: scikit-learn's 1797 handwritten 8×8 digits (10 classes), split 1/3 : 1/3 : 1/3
  (599 samples each): a larger train share would leave val/test at a few hundred samples whose
  noise rivals the effects measured. MLP 64 → 512 → 512 → 10 with ReLU, AdamW (lr 1e-4, no
  weight decay), batch 32, 150 epochs (2 850 steps). At 40 % symmetric noise (mean of 8
  seeds) the base model's val NLL is lowest at epoch 15 (1.81 nats) and climbs to 3.05 by
  epoch 150 as it memorises the flipped labels (training loss on noisy labels 0.19 at the end;
  clean test error 7.1 % at epoch 20, 25.4 % at epoch 150): the overfitting regime in which
  post-hoc transforms can reverse the base trends.
* ``tabular``: scikit-learn ``make_classification`` with a fixed seed, 20 features (8
  informative, 4 redundant), 4 classes with 2 Gaussian clusters each, 6000 samples split
  1/3 : 1/3 : 1/3 (2000 each, val/test standard error ≤ 1.1 points). Same MLP shape
  (20 → 512 → 512 → 4), AdamW lr 3e-4, batch 64, 100 epochs; at 40 % symmetric noise the base
  val NLL is lowest at epochs 5–7 (4 seeds) and rises steadily after.

AdamW at a constant learning rate (the training loop has no schedule) is the optimizer: its
learning rate sets how many epochs the fit-then-memorise transition spans, and at these rates
it spans tens of epochs, enough for epoch selection to have something to choose. SGD with
momentum 0.9 at lr 1e-2 reaches its best digits val NLL by epoch 5, too early to resolve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from beyondloss.metrics.classification import classification_metrics, error_rate, nll
from beyondloss.posthoc.tracker import EvalSplit
from beyondloss.tasks.base import Splits

NOISE_KINDS = ("symmetric", "class")
"""Noise models: ``"symmetric"`` (uniform over the other classes) and ``"class"`` (pair flip
``c → π(c)``)."""

SPLIT_NAMES = ("train", "val", "test")

Seed = int | Sequence[int]
"""Seed of :func:`numpy.random.default_rng`: an integer ``>= 0`` or a sequence of them."""


@dataclass(frozen=True)
class NoisyLabels:
    """Noisy labels ``(N,)`` and the clean labels ``(N,)`` they were drawn from (int64)."""

    noisy: Tensor
    clean: Tensor

    @property
    def flipped(self) -> Tensor:
        """Boolean mask ``(N,)`` of the samples whose label was changed."""
        return self.noisy != self.clean

    @property
    def rate(self) -> float:
        """Realised noise rate: the fraction of flipped labels."""
        return float(self.flipped.double().mean()) if self.clean.numel() else 0.0


def pair_flip_map(n_classes: int) -> Tensor:
    """The default class-dependent map ``π(c) = (c + 1) mod C`` as a ``(C,)`` int64 tensor."""
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    return (torch.arange(n_classes) + 1) % n_classes


def _check_labels(labels: Tensor, n_classes: int, rate: float) -> np.ndarray:
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    y = torch.as_tensor(labels).cpu().numpy()
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(y.shape)}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _draws(y: np.ndarray, n_classes: int, seed: Seed) -> tuple[list[np.ndarray], np.ndarray]:
    """Per class, its sample indices in random flip order; per sample, an offset in 1..C-1.

    Independent of the rate, so lower rates flip a prefix of what higher rates flip.
    """
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(y == c)) for c in range(n_classes)]
    offsets = rng.integers(1, n_classes, size=y.size)
    return order, offsets


def _flip_mask(y: np.ndarray, order: list[np.ndarray], rate: float) -> np.ndarray:
    mask = np.zeros(y.size, dtype=bool)
    for indices in order:
        mask[indices[: round(rate * indices.size)]] = True
    return mask


def symmetric_noise(labels: Tensor, n_classes: int, rate: float, seed: Seed) -> NoisyLabels:
    """Flip exactly ``round(rate · n_c)`` labels of each class ``c`` to a uniformly random
    other class (see the module docstring); deterministic in ``seed``."""
    y = _check_labels(labels, n_classes, rate)
    order, offsets = _draws(y, n_classes, seed)
    mask = _flip_mask(y, order, rate)
    noisy = np.where(mask, (y + offsets) % n_classes, y)
    return NoisyLabels(torch.from_numpy(noisy), torch.from_numpy(y))


def class_dependent_noise(
    labels: Tensor, n_classes: int, rate: float, seed: Seed, mapping: Tensor | None = None
) -> NoisyLabels:
    """Flip exactly ``round(rate · n_c)`` labels of each class ``c`` to ``mapping[c]``.

    ``mapping`` ``(C,)`` is a permutation of ``0..C-1`` without fixed points (default
    :func:`pair_flip_map`); deterministic in ``seed``.
    """
    y = _check_labels(labels, n_classes, rate)
    pi = pair_flip_map(n_classes) if mapping is None else torch.as_tensor(mapping).long()
    if pi.shape != (n_classes,) or sorted(pi.tolist()) != list(range(n_classes)):
        raise ValueError(f"mapping must be a permutation of 0..{n_classes - 1}, got {pi.tolist()}")
    if bool((pi == torch.arange(n_classes)).any()):
        raise ValueError(f"mapping must move every class, got {pi.tolist()}")
    order, _ = _draws(y, n_classes, seed)
    mask = _flip_mask(y, order, rate)
    noisy = np.where(mask, pi.numpy()[y], y)
    return NoisyLabels(torch.from_numpy(noisy), torch.from_numpy(y))


def add_label_noise(
    labels: Tensor, n_classes: int, rate: float, kind: str, seed: Seed
) -> NoisyLabels:
    """Noise of ``kind`` (one of :data:`NOISE_KINDS`) at ``rate``; the default map for
    ``"class"``."""
    if kind == "symmetric":
        return symmetric_noise(labels, n_classes, rate, seed)
    if kind == "class":
        return class_dependent_noise(labels, n_classes, rate, seed)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: Seed
) -> list[np.ndarray]:
    """Partition ``range(N)`` into ``len(fractions)`` index arrays, stratified by class.

    In each class, a random permutation of its ``n_c`` indices is cut at
    ``round(n_c · cumsum(fractions))``; ``fractions`` must be positive and sum to 1. Each part
    comes out sorted.
    """
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0 or (shares <= 0).any():
        raise ValueError(f"fractions must be positive, got {list(fractions)}")
    if not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"fractions must sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in shares]
    for c in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(shares)[:-1] * indices.size).astype(int)
        for part, chunk in zip(parts, np.split(indices, cuts), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def mlp(n_features: int, n_classes: int, hidden: Sequence[int] = (512, 512)) -> nn.Sequential:
    """``Linear → ReLU`` per hidden width, then a linear head: ``(B, d) → (B, C)`` logits."""
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    """Training loss of a ``(inputs (B, d), labels (B,))`` batch: mean cross-entropy in nats."""
    inputs, labels = batch[0], batch[1]
    device = next(model.parameters()).device
    return F.cross_entropy(model(inputs.to(device)), labels.to(device))


def load_digits_data(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: inputs ``(1797, 64)`` (pixel intensities 0..16), labels
    ``(1797,)`` in 0..9. Shipped with scikit-learn; ``data_seed`` is unused (fixed data)."""
    from sklearn.datasets import load_digits

    inputs, labels = load_digits(return_X_y=True)
    return inputs.astype(np.float32), labels.astype(np.int64)


def load_tabular_data(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_classification``: 6000 samples, 20 features (8 informative, 4 redundant, 8
    noise), 4 classes of 2 clusters each, class separation 1, no built-in label noise."""
    from sklearn.datasets import make_classification

    inputs, labels = make_classification(
        n_samples=6000,
        n_features=20,
        n_informative=8,
        n_redundant=4,
        n_classes=4,
        n_clusters_per_class=2,
        class_sep=1.0,
        flip_y=0.0,
        random_state=data_seed,
    )
    return inputs.astype(np.float32), labels.astype(np.int64)


@dataclass(frozen=True)
class NoisyLabelData:
    """One dataset with noisy labels, ready for the training loop and the tracker.

    Attributes
    ----------
    train:
        ``TensorDataset(inputs (N_train, d) float32, noisy labels (N_train,) int64)``.
    train_clean:
        Clean training labels ``(N_train,)`` (not used for training).
    val, test:
        Inputs, noisy labels and clean labels of the evaluation splits.
    n_features, n_classes:
        ``d`` and ``C``.
    """

    train: TensorDataset
    train_clean: Tensor
    val: EvalSplit
    test: EvalSplit
    n_features: int
    n_classes: int


@dataclass(frozen=True)
class NoisyLabelDataset:
    """A classification dataset, its model and its training budget.

    Attributes
    ----------
    name:
        Identifier on the command line and in run ids.
    load:
        ``data_seed -> (inputs (N, d), labels (N,))``; a module-level function, so the dataset
        can be sent to worker processes.
    make_model:
        ``(d, C) -> model`` mapping ``(B, d)`` inputs to ``(B, C)`` logits; initialised from the
        global torch RNG.
    epochs, batch_size:
        Training budget (the same for every configuration and seed).
    optimizer, lr, weight_decay:
        Optimizer name for :func:`beyondloss.optim.factory.make_optimizer` and the default
        configuration (a study's grid may override ``lr`` and ``weight_decay``).
    n_samples:
        Use a stratified random subset of this many samples (``None``: all).
    fractions:
        Train, val and test shares of the samples.
    data_seed:
        Seeds the data, the subset, the split and the label noise (shared by every run).
    """

    name: str
    load: Callable[[int], tuple[np.ndarray, np.ndarray]]
    make_model: Callable[[int, int], nn.Module]
    epochs: int
    batch_size: int
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    n_samples: int | None = None
    fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    data_seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(
                f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.n_samples is not None and self.n_samples < 3:
            raise ValueError(f"n_samples must be >= 3 or None, got {self.n_samples}")
        if len(self.fractions) != 3:
            raise ValueError(f"fractions must give train, val, test shares: {self.fractions}")

    def build(self, noise: float, kind: str = "symmetric") -> NoisyLabelData:
        """Split, standardise and corrupt the data (see the module docstring).

        The noise of split ``k`` (train 0, val 1, test 2) is seeded by ``(data_seed, k)``.
        """
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
        inputs, labels = self.load(self.data_seed)
        n_classes = int(labels.max()) + 1
        if self.n_samples is not None and self.n_samples < labels.size:
            share = self.n_samples / labels.size
            subset, _ = stratified_split(labels, (share, 1 - share), (self.data_seed, 3))
            inputs, labels = inputs[subset], labels[subset]
        parts = stratified_split(labels, self.fractions, (self.data_seed, 4))
        mean = inputs[parts[0]].mean(axis=0)
        std = inputs[parts[0]].std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        splits = {}
        for k, (name, indices) in enumerate(zip(SPLIT_NAMES, parts, strict=True)):
            x = torch.from_numpy(((inputs[indices] - mean) / std).astype(np.float32))
            y = add_label_noise(
                torch.from_numpy(labels[indices]), n_classes, noise, kind, (self.data_seed, k)
            )
            splits[name] = (x, y)
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits.values()
        return NoisyLabelData(
            train=TensorDataset(x_train, y_train.noisy),
            train_clean=y_train.clean,
            val=EvalSplit(x_val, y_val.noisy, y_val.clean),
            test=EvalSplit(x_test, y_test.noisy, y_test.clean),
            n_features=inputs.shape[1],
            n_classes=n_classes,
        )


DIGITS = NoisyLabelDataset(
    name="digits", load=load_digits_data, make_model=mlp, epochs=150, batch_size=32, lr=1e-4
)
"""scikit-learn digits, MLP, AdamW lr 1e-4, 150 epochs of batch 32 (see the module docstring)."""

TABULAR = NoisyLabelDataset(
    name="tabular", load=load_tabular_data, make_model=mlp, epochs=100, batch_size=64, lr=3e-4
)
"""``make_classification`` tabular task, MLP, AdamW lr 3e-4, 100 epochs of batch 64."""

DATASETS: dict[str, NoisyLabelDataset] = {d.name: d for d in (DIGITS, TABULAR)}
"""Dataset name → :class:`NoisyLabelDataset`."""


CLASSIFICATION_METRICS = {
    "error": False,
    "nll": False,
    "ece": False,
    "brier": False,
    "clean_error": False,
    "clean_nll": False,
}
"""Metrics of :meth:`NoisyLabelTask.evaluate` (all lower-is-better): on the split's noisy labels,
and ``clean_*`` on its clean labels."""


class NoisyLabelTask:
    """Classification under label noise as a :class:`~beyondloss.tasks.base.Task`.

    The model maps inputs to logits and is trained with cross-entropy on the noisy training
    labels; it is "deployed" as a classifier, judged on the noisy labels of val or test (as in
    the post-hoc reversal paper, selection sees noisy val labels only) and, beside them, on the
    clean labels (``clean_error``, ``clean_nll``). The primary metric is the noisy-label error;
    the validation loss of a study is the noisy-label val NLL, so the two criteria the post-hoc
    paper contrasts (NLL and error) are the study's naive and downstream criteria.

    Parameters
    ----------
    dataset:
        Inputs, model and training budget (:data:`DATASETS`).
    noise, kind:
        Label-noise rate and kind (:data:`NOISE_KINDS`) on every split.
    epochs:
        Training epochs; ``None`` keeps the dataset's.
    """

    primary_metric = "error"
    higher_is_better = CLASSIFICATION_METRICS

    def __init__(
        self, dataset: NoisyLabelDataset, noise: float, kind: str, epochs: int | None = None
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.dataset = dataset
        self.noise = noise
        self.kind = kind
        self.epochs = dataset.epochs if epochs is None else epochs
        self.batch_size = dataset.batch_size
        self.name = f"noisy-{dataset.name}-{kind}{noise:g}"
        self._cached: NoisyLabelData | None = None

    def data(self) -> NoisyLabelData:
        """The split, standardised, corrupted data (built once)."""
        if self._cached is None:
            self._cached = self.dataset.build(self.noise, self.kind)
        return self._cached

    def splits(self) -> Splits:
        data = self.data()
        val, test = (TensorDataset(s.inputs, s.labels) for s in (data.val, data.test))
        return Splits(train=data.train, val=val, test=test)

    def make_model(self) -> nn.Module:
        data = self.data()
        return self.dataset.make_model(data.n_features, data.n_classes)

    def loss(self, model: nn.Module, batch: object) -> Tensor:
        return cross_entropy(model, batch)

    def predict(self, model: nn.Module, split: str) -> Tensor:
        """Logits ``(N, C)`` of ``model`` on ``split``'s inputs (float32, on the CPU), in eval
        mode under ``torch.no_grad``; the model's training mode is restored afterwards."""
        inputs = self._split(split).inputs
        first = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(inputs.to(device=first.device, dtype=first.dtype))
        finally:
            model.train(was_training)
        return logits.float().cpu()

    def labels(self, split: str) -> Tensor:
        """Observed (noisy) labels ``(N,)`` of ``split``, the labels selection may use."""
        return self._split(split).labels

    def evaluate(
        self, model: nn.Module, split: str = "test", primary_only: bool = False
    ) -> dict[str, float]:
        """:data:`CLASSIFICATION_METRICS` of ``model`` on ``split`` (only ``error`` with
        ``primary_only``); see :func:`~beyondloss.metrics.classification.classification_metrics`."""
        logits = self.predict(model, split)
        return self.score(logits, split, primary_only)

    def score(self, logits: Tensor, split: str, primary_only: bool = False) -> dict[str, float]:
        """The metrics of :meth:`evaluate` from logits ``(N, C)`` of ``split`` (for output-space
        transforms: temperature-scaled or ensembled logits are scored here)."""
        data = self._split(split)
        if primary_only:
            return {"error": error_rate(logits, data.labels)}
        metrics = classification_metrics(logits, data.labels)
        if data.clean_labels is not None:
            metrics["clean_error"] = error_rate(logits, data.clean_labels)
            metrics["clean_nll"] = nll(logits, data.clean_labels)
        return metrics

    def _split(self, split: str) -> EvalSplit:
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return getattr(self.data(), split)


QUICK_EPOCHS = {"digits": 40, "tabular": 30}
"""Epochs of the quick size: past the base model's best val NLL (epochs 12–15 on digits, 5–7 on
tabular) and into memorisation, where post-hoc transforms can reverse its trends."""


def make_noisy_task(
    size: str,
    data_seed: int,
    dataset: str | NoisyLabelDataset = "digits",
    noise: float = 0.4,
    kind: str = "symmetric",
) -> NoisyLabelTask:
    """:class:`NoisyLabelTask` on ``dataset`` (a name in :data:`DATASETS`, or a
    :class:`NoisyLabelDataset`) with data seed ``data_seed``: ``"full"`` trains the dataset's
    epochs, ``"quick"`` :data:`QUICK_EPOCHS` (the dataset's own epochs for a dataset not named
    there). Bind the other arguments with ``functools.partial`` for a registry factory."""
    if size not in ("quick", "full"):
        raise ValueError(f"unknown task size {size!r}; expected 'quick' or 'full'")
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
            )
        dataset = DATASETS[dataset]
    spec = replace(dataset, data_seed=data_seed)
    epochs = QUICK_EPOCHS.get(spec.name) if size == "quick" else None
    return NoisyLabelTask(spec, noise, kind, epochs)
