"""End to end: a tiny post-hoc study writes its files, tables and report; reruns skip runs."""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from beyondloss.optim.factory import make_optimizer
from beyondloss.posthoc.tracker import PosthocTracker
from beyondloss.study import posthoc, ttf
from beyondloss.study.posthoc import TRANSFORMS, PosthocStudyResult, run_posthoc_study
from beyondloss.study.posthoc_cli import add_posthoc_command, posthoc_command_line
from beyondloss.tasks import noisy_labels
from beyondloss.tasks.noisy_labels import DIGITS
from beyondloss.train import TrainConfig, train

TINY = replace(DIGITS, name="digits-tiny", epochs=3, n_samples=150, lr=1e-3)
NAMES = [c.name for c in TRANSFORMS]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PosthocStudyResult:
    out = tmp_path_factory.mktemp("posthoc")
    return run_posthoc_study(
        TINY, 0.4, "symmetric", seeds=2, lrs=[1e-3, 3e-3], out=out, workers=2, progress=False
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beyondloss")
    add_posthoc_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_study_trains_every_run_and_writes_its_files(study: PosthocStudyResult) -> None:
    assert study.directory.name == "posthoc-digits-tiny-symmetric0.4"
    assert len(study.trained) == 4 and study.skipped == ()
    for name in ("report.md", "table.csv", "reversal.md", "curves.png"):
        assert (study.directory / name).stat().st_size > 0
    assert len(list(study.directory.glob("runs/*/checkpoint.pt"))) == 4
    assert (study.directory.parent / "beyondloss.db").exists()


def test_table_has_a_row_per_transform_and_selection_with_both_label_sets(
    study: PosthocStudyResult,
) -> None:
    for scope in ("default", "grid"):
        for metric in ("error", "nll"):
            rows = [r for r in study.rows if r["scope"] == scope and r["metric"] == metric]
            assert [r["transform"] for r in rows] == NAMES
            for row in rows:
                for key in (f"test_{metric}", f"test_clean_{metric}"):
                    assert row[f"{key}_gain"] == pytest.approx(
                        row[f"{key}_naive"] - row[f"{key}_posthoc"]
                    )
    with open(study.directory / "table.csv") as file:
        assert len(list(csv.DictReader(file))) == len(study.rows) == 32
    for name in NAMES:
        assert f"| {name} |" in study.markdown
    assert "Command: `run_posthoc_study('digits-tiny'" in study.markdown
    assert "## Over configs" in study.reversal and "| SWA+Ens+TS |" in study.reversal


def test_rerun_through_the_cli_skips_completed_runs_and_gives_the_same_table(
    study: PosthocStudyResult, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(noisy_labels.DATASETS, TINY.name, TINY)
    out = study.directory.parent
    args = _parser().parse_args(
        ["posthoc", TINY.name, "--seeds", "2", "--lrs", "1e-3,3e-3", "--workers", "1"]
        + ["--out", str(out)]
    )
    args.no_progress = True
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "0 runs trained, 4 already complete" in printed and "# Post-hoc reversal" in printed
    assert f"Command: `{posthoc_command_line(args)}`" in printed
    with open(study.directory / "table.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["test_nll_posthoc"]) for r in rows] == pytest.approx(
        [r["test_nll_posthoc"] for r in study.rows]
    )


def test_a_log_of_another_length_is_refused(study: PosthocStudyResult) -> None:
    longer = replace(TINY, epochs=4)
    with pytest.raises(ValueError, match="another out folder"):
        run_posthoc_study(longer, 0.4, seeds=2, lrs=[1e-3], out=study.directory.parent)


def test_cli_parses_and_validates_its_options() -> None:
    args = _parser().parse_args(
        ["posthoc", "digits", "--noise", "0.2", "--noise-kind", "class", "--weight-decays", "0,0.1"]
    )
    assert (args.noise, args.noise_kind, args.seeds, args.lrs) == (0.2, "class", 8, None)
    assert args.weight_decays == (0.0, 0.1) and args.out == Path("runs")
    assert posthoc_command_line(args) == (
        "beyondloss posthoc digits --noise 0.2 --noise-kind class --seeds 8 "
        "--weight-decays 0,0.1 --workers 2 --out runs"
    )
    for bad in (["--noise", "1.5"], ["--lrs", "0"], ["--seeds", "0"], ["--noise-kind", "x"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["posthoc", "digits", *bad])


def test_a_killed_run_resumes_with_its_logits_and_swa(tmp_path: Path) -> None:
    """The run's checkpoint holds the tracker: 2 epochs, then a restart to 3, equals 3 straight."""
    job = posthoc.run_job(TINY, 0.4, "symmetric", 1e-3, 0.0, 0, tmp_path)
    task = job.factory(job.size, job.data_seed)

    def fit(epochs: int, run_dir: Path) -> PosthocTracker:
        torch.manual_seed(0)
        model = task.make_model()
        optimizer = make_optimizer("adamw", model, lr=1e-3)
        (evaluator,) = ttf._evaluators(task, job)
        config = TrainConfig(epochs=epochs, batch_size=task.batch_size, seed=0)
        train(
            model,
            optimizer,
            task.splits().train,
            task.loss,
            config,
            [evaluator],
            run_dir=run_dir,
            progress=False,
        )
        return evaluator.tracker

    fit(2, tmp_path / "killed")
    resumed, straight = fit(3, tmp_path / "killed"), fit(3, tmp_path / "clean")
    assert resumed.epochs == straight.epochs == [1, 2, 3]
    for kind in ("base", "swa"):
        for split in ("val", "test"):
            assert torch.equal(resumed.logits(kind, split), straight.logits(kind, split))
    swa = resumed.averages["swa"].module.state_dict()
    assert all(
        torch.equal(v, straight.averages["swa"].module.state_dict()[k]) for k, v in swa.items()
    )
