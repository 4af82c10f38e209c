"""Label-noise models (exact rates, determinism, maps) and the noisy-label datasets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from beyondloss.tasks.noisy_labels import (
    DIGITS,
    TABULAR,
    add_label_noise,
    class_dependent_noise,
    make_noisy_task,
    mlp,
    pair_flip_map,
    stratified_split,
    symmetric_noise,
)

C = 10
LABELS = torch.arange(5000) % C  # 500 per class


def _transitions(clean: torch.Tensor, noisy: torch.Tensor, n_classes: int = C) -> np.ndarray:
    counts = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(counts, (clean.numpy(), noisy.numpy()), 1)
    return counts


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 1.0])
def test_symmetric_noise_flips_exactly_the_rate_of_each_class_and_never_keeps_the_label(
    rate: float,
) -> None:
    out = symmetric_noise(LABELS, C, rate, seed=7)
    assert torch.equal(out.clean, LABELS) and out.noisy.dtype == torch.int64
    counts = _transitions(out.clean, out.noisy)
    # Exactly round(rate · 500) samples of every class end up on another class.
    assert (counts.sum(axis=1) - np.diag(counts) == round(rate * 500)).all()
    assert out.rate == pytest.approx(rate)
    if rate == 0.4:  # the replacement is spread over all other classes (≈ 22 each)
        off = counts[~np.eye(C, dtype=bool)]
        assert off.min() >= 8 and off.max() <= 40


def test_class_dependent_noise_follows_its_map() -> None:
    out = class_dependent_noise(LABELS, C, 0.3, seed=1)
    pi = pair_flip_map(C)
    flipped = out.flipped
    assert torch.equal(out.noisy[flipped], pi[out.clean[flipped]])
    assert (_transitions(out.clean, out.noisy).diagonal() == 350).all()
    custom = torch.tensor([3, 0, 1, 2])
    labels = torch.arange(400) % 4
    out = class_dependent_noise(labels, 4, 0.5, seed=1, mapping=custom)
    assert torch.equal(out.noisy[out.flipped], custom[labels[out.flipped]])
    assert out.rate == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["symmetric", "class"])
def test_noise_is_deterministic_by_seed_and_nested_across_rates(kind: str) -> None:
    a = add_label_noise(LABELS, C, 0.4, kind, seed=3)
    b = add_label_noise(LABELS, C, 0.4, kind, seed=3)
    c = add_label_noise(LABELS, C, 0.4, kind, seed=4)
    assert torch.equal(a.noisy, b.noisy) and not torch.equal(a.noisy, c.noisy)
    low = add_label_noise(LABELS, C, 0.2, kind, seed=3)
    assert bool((a.flipped | ~low.flipped).all())  # flipped at 20 % ⇒ flipped at 40 %
    assert torch.equal(a.noisy[low.flipped], low.noisy[low.flipped])


def test_invalid_noise_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(LABELS, C, 1.5, seed=0)
    with pytest.raises(ValueError, match="0..9"):
        symmetric_noise(LABELS + 1, C, 0.1, seed=0)
    with pytest.raises(ValueError, match="move every class"):
        class_dependent_noise(LABELS, C, 0.1, seed=0, mapping=torch.arange(C))
    with pytest.raises(ValueError, match="permutation"):
        class_dependent_noise(LABELS, C, 0.1, seed=0, mapping=torch.ones(C, dtype=torch.long))
    with pytest.raises(ValueError, match="noise kind"):
        add_label_noise(LABELS, C, 0.1, "asymmetric", seed=0)


def test_stratified_split_partitions_every_class_by_the_fractions() -> None:
    labels = np.arange(900) % 3
    parts = stratified_split(labels, (0.5, 0.25, 0.25), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(900))
    assert [len(p) for p in parts] == [450, 225, 225]
    assert all((np.bincount(labels[p]) == len(p) // 3).all() for p in parts)


def test_digits_splits_are_equal_thirds_standardised_with_noisy_val_and_test() -> None:
    data = DIGITS.build(0.4, "symmetric")
    x_train, y_train = data.train.tensors
    sizes = (len(y_train), data.val.labels.numel(), data.test.labels.numel())
    assert sizes == (599, 599, 599) and (data.n_features, data.n_classes) == (64, 10)
    assert x_train.mean(dim=0).abs().max() < 1e-5
    for noisy, clean in ((y_train, data.train_clean), (data.val.labels, data.val.clean_labels)):
        assert abs(float((noisy != clean).double().mean()) - 0.4) <= C / (2 * 599)
    again = DIGITS.build(0.4, "symmetric")
    assert torch.equal(again.test.labels, data.test.labels)
    pair = DIGITS.build(0.2, "class")
    flipped = pair.val.labels != pair.val.clean_labels
    assert torch.equal(pair.val.labels[flipped], (pair.val.clean_labels[flipped] + 1) % 10)


def test_tabular_subset_and_model_shapes() -> None:
    data = replace(TABULAR, n_samples=300).build(0.2, "class")
    assert (data.n_features, data.n_classes, len(data.train)) == (20, 4, 100)
    model = mlp(data.n_features, data.n_classes, hidden=(8,))
    assert model(data.val.inputs).shape == (100, 4)


def test_noisy_label_classification_is_a_registered_task() -> None:
    from beyondloss.metrics.classification import classification_metrics, error_rate, nll
    from beyondloss.tasks import TASKS, Task, make_task

    assert {"noisy-digits", "noisy-tabular"} <= set(TASKS)
    task = make_task("noisy-digits", "quick")
    assert isinstance(task, Task)
    assert task.epochs == 40 and task.batch_size == 32
    assert make_task("noisy-digits", "full").epochs == 150
    assert make_task("noisy-tabular", "quick").kind == "class"
    splits = task.splits()
    data = task.data()
    assert torch.equal(splits.val.tensors[1], data.val.labels)  # selection sees noisy labels
    torch.manual_seed(0)
    model = task.make_model()
    logits = model(data.test.inputs).detach()
    metrics = task.evaluate(model, "test")
    assert metrics == pytest.approx(
        classification_metrics(logits, data.test.labels)
        | {
            "clean_error": error_rate(logits, data.test.clean_labels),
            "clean_nll": nll(logits, data.test.clean_labels),
        },
        abs=1e-6,
    )
    assert set(metrics) == set(task.higher_is_better)
    assert task.evaluate(model, "val", primary_only=True) == {
        "error": task.evaluate(model, "val")["error"]
    }
    batch = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8)))
    assert float(task.loss(model, batch)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(model(batch[0]), batch[1]))
    )
    with pytest.raises(ValueError, match="split must be"):
        task.evaluate(model, "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        make_noisy_task("quick", 0, dataset="mnist")
