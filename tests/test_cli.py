"""Tests of the command line: parsing into a study spec, ``ttf all``, input validation, help and
version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from beyondloss import __version__, cli
from beyondloss.study import StudySpec


@pytest.fixture
def specs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[StudySpec, bool, str]]:
    """Captures ``(spec, progress, command)`` of every study the CLI starts, without training."""
    calls: list[tuple[StudySpec, bool, str]] = []

    def fake_run_study(spec: StudySpec, progress: bool, command: str) -> SimpleNamespace:
        calls.append((spec, progress, command))
        return SimpleNamespace(markdown="| the table |")

    monkeypatch.setattr(cli, "run_study", fake_run_study)
    return calls


@pytest.fixture
def suites(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Captures the arguments of every ``run_all`` the CLI starts, without training; a study
    failed when ``failures`` is set on the fixture's list before the call."""
    calls: list[dict[str, object]] = []

    def fake_run_all(size: str, progress: bool, command: str, **study: object) -> SimpleNamespace:
        calls.append({"size": size, "progress": progress, "command": command, **study})
        failures = {"flow": "Traceback ...\nRuntimeError: boom"} if study["workers"] == 1 else {}
        return SimpleNamespace(markdown="| the summary |", failures=failures)

    monkeypatch.setattr(cli, "run_all", fake_run_all)
    return calls


def test_defaults_come_from_the_study_spec(
    specs: list[tuple[StudySpec, bool, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ttf", "lorenz"]) == 0
    [(spec, progress, command)] = specs
    assert spec == StudySpec("lorenz")
    assert spec.optimizers == ("adamw", "dopr-adamw", "muon", "dopr-muon") and spec.seeds == 3
    assert progress and command == "beyondloss ttf lorenz"
    assert capsys.readouterr().out == "| the table |\n"


def test_every_option_reaches_the_spec(specs: list[tuple[StudySpec, bool, str]]) -> None:
    argv = [
        "ttf", "lorenz", "--size", "full", "--optimizers", "sgd, dopr-sgd", "--seeds", "2",
        "--lrs", "1e-3,3e-2", "--weight-decay", "0.01", "--workers", "1", "--out", "elsewhere",
        "--no-progress", "--damping", "0.01", "--damping-mode", "trace", "--cov-every", "10",
        "--inverse-every", "20", "--sigma-ema-decay", "0.9", "--transforms", "swa,ema",
        "--transform-every", "2", "--eval-every", "3", "--scope", "hidden", "--ddp", "2",
        "--ema-decays", "0.99,0.999", "--schedule", "cosine", "--warmup", "0.05",
        "--epochs", "7",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    [(spec, progress, command)] = specs
    assert spec == StudySpec(
        task="lorenz",
        size="full",
        optimizers=("sgd", "dopr-sgd"),
        lrs=(1e-3, 3e-2),
        seeds=2,
        weight_decay=0.01,
        dopr={
            "damping": 0.01,
            "damping_mode": "trace",
            "cov_every": 10,
            "inverse_every": 20,
            "ema_decay": 0.9,
            "scope": "hidden",
        },
        transforms=("swa", "ema"),
        ema_decays=(0.99, 0.999),
        transform_every=2,
        eval_every=3,
        schedule="cosine",
        warmup=0.05,
        epochs=7,
        workers=1,
        out=Path("elsewhere"),
        ddp=2,
    )
    assert "-hidden-" in spec.run_id("dopr-sgd", 1e-3, 0)
    assert spec.run_id("sgd", 1e-3, 0) == (
        "lorenz-full-sgd-lr0.001-wd0.01-ep7-cosine-wu0.05-eval3-swa+ema0.99+ema0.999-every2-s0"
    )
    assert not progress
    assert command == "beyondloss ttf lorenz --size full --optimizers 'sgd, dopr-sgd' " + (
        "--seeds 2 --lrs 1e-3,3e-2 --weight-decay 0.01 --workers 1 --out elsewhere --no-progress "
        "--damping 0.01 --damping-mode trace --cov-every 10 --inverse-every 20 "
        "--sigma-ema-decay 0.9 --transforms swa,ema --transform-every 2 --eval-every 3 "
        "--scope hidden --ddp 2 --ema-decays 0.99,0.999 --schedule cosine --warmup 0.05 "
        "--epochs 7"
    )


def test_ttf_all_passes_the_options_to_run_all_and_prints_the_summary(
    suites: list[dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ttf", "all", "--size", "full", "--cov-every", "4"]) == 0
    [call] = suites
    assert call == {
        "size": "full",
        "progress": True,
        "command": "beyondloss ttf all --size full --cov-every 4",
        "tasks": None,
        "optimizers": ("adamw", "dopr-adamw", "muon", "dopr-muon"),
        "lrs": None,
        "seeds": None,
        "weight_decay": 0.0,
        "dopr": {"cov_every": 4},
        "transforms": (),
        "ema_decays": (0.999,),
        "schedule": "constant",
        "warmup": 0.0,
        "epochs": None,
        "transform_every": 1,
        "eval_every": 1,
        "workers": 2,
        "out": Path("runs"),
    }
    assert capsys.readouterr().out == "| the summary |\n"


def test_ttf_all_exits_1_and_prints_tracebacks_when_a_task_failed(
    suites: list[dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ttf", "all", "--workers", "1", "--seeds", "5"]) == 1
    assert suites[0]["seeds"] == 5
    captured = capsys.readouterr()
    assert captured.out == "| the summary |\n" and "RuntimeError: boom" in captured.err


def test_ttf_all_validates_every_spec_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["ttf", "all", "--optimizers", "adamw", "--cov-every", "2", "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "apply to dopr-* optimizers only" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["ttf", "lorentz"], "unknown task 'lorentz': choose from lorenz, lorenz96"),
        (["ttf", "--task", "lorenz", "sort"], "give the task once: as TASK or as --task"),
        (["ttf"], "give the task once: as TASK or as --task"),
        (["ttf", "no_such_module:make"], "cannot import 'no_such_module' for the task"),
        (["ttf", "missing.py:make"], "no file "),
        (["ttf", "json:nothing"], "json has no 'nothing' (the task 'json:nothing')"),
        (["ttf", "json:__doc__"], "the task 'json:__doc__' is a str, not a factory"),
        (["ttf", "lorenz", "--optimizers", "adamw,json:nope"], "json has no 'nope'"),
        (["ttf", "lorenz", "--optimizers", "dopr-x=json:loads"], "'dopr-x' is DoPr's own"),
        (["ttf", "lorenz", "--optimizers", "a/b=json:loads"], "must be letters, digits"),
        (["ttf", "lorenz", "--optimizers", "x=adamw"], "give the built-in optimizer 'adamw'"),
        (["ttf", "lorenz", "--optimizers", "loads=json:loads,json:loads"], "must be distinct"),
        (["study", "all", "--tasks", "lorenz,lorentz"], "unknown tasks ['lorentz']"),
        (["study", "lorenz", "--tasks", "sort"], "--tasks applies to TASK 'all' only"),
        (["study", "all", "--metric", "nll"], "--metric applies to one TASK, not 'all'"),
        (["study", "lorenz", "--address", "auto"], "address applies to executor 'ray' only"),
        (["study", "lorenz", "--executor", "dask"], "invalid choice: 'dask'"),
        (["study", "lorenz", "--metric", "nll"], "task lorenz has no metric 'nll'; it has vpt"),
        (["study", "lorenz", "--transforms", "ts"], "'ts' transform needs a task whose model"),
        (["ttf", "lorenz", "--size", "huge"], "invalid choice: 'huge'"),
        (["ttf", "lorenz", "--optimizers", "adamw,adam"], "unknown optimizer 'adam': choose from"),
        (["ttf", "lorenz", "--optimizers", ","], "at least one optimizer"),
        (["ttf", "lorenz", "--optimizers", "muon,muon"], "optimizers must be distinct"),
        (["ttf", "lorenz", "--lrs", "1e-3,fast"], "not a number: 'fast'"),
        (["ttf", "lorenz", "--lrs", "0"], "learning rates must be positive"),
        (["ttf", "lorenz", "--lrs", "1e-3,0.001"], "learning rates must be distinct"),
        (["ttf", "lorenz", "--seeds", "0"], "--seeds: must be at least 1"),
        (["ttf", "lorenz", "--seeds", "2.5"], "--seeds: not an integer"),
        (["ttf", "lorenz", "--workers", "0"], "--workers: must be at least 1"),
        (["ttf", "lorenz", "--ddp", "0"], "--ddp: must be at least 1"),
        (["ttf", "lorenz", "--scope", "middle"], "invalid choice: 'middle'"),
        (["ttf", "lorenz", "--weight-decay", "-1"], "--weight-decay: must be finite and >= 0"),
        (["ttf", "lorenz", "--bogus"], "unrecognized arguments: --bogus"),
        (["ttf", "lorenz", "--cov-every", "0"], "dopr cov_every must be an integer >= 1"),
        (["ttf", "lorenz", "--inverse-every", "x"], "--inverse-every: invalid int value: 'x'"),
        (["ttf", "lorenz", "--sigma-ema-decay", "1"], "dopr ema_decay must be >= 0 and < 1"),
        (["ttf", "lorenz", "--ema-decay", "0.9"], "--ema-decay is ambiguous and no longer"),
        (["ttf", "lorenz", "--schedule", "step"], "invalid choice: 'step'"),
        (["ttf", "lorenz", "--warmup", "1"], "--warmup: must be a fraction in [0, 1)"),
        (["ttf", "lorenz", "--warmup", "-0.1"], "--warmup: must be a fraction in [0, 1)"),
        (["ttf", "lorenz", "--epochs", "0"], "--epochs: must be at least 1"),
        (["ttf", "lorenz", "--transforms", "ema", "--ema-decays", "1"], "decays must lie in"),
        (["ttf", "lorenz", "--transforms", "ema", "--ema-decays", "0"], "decays must lie in"),
        (["ttf", "lorenz", "--ema-decays", "0.99"], "ema_decays apply to the 'ema' transform"),
        (
            ["ttf", "lorenz", "--transforms", "ema", "--ema-decays", "0.99,0.990"],
            "ema_decays must be distinct",
        ),
        (["ttf", "lorenz", "--damping", "-0.1"], "dopr damping must be finite and >= 0"),
        (["ttf", "lorenz", "--damping-mode", "fro"], "invalid choice: 'fro'"),
        (
            ["ttf", "lorenz", "--optimizers", "muon", "--sigma-ema-decay", "0.5"],
            "apply to dopr-* optimizers only",
        ),
    ],
)
def test_bad_input_exits_with_a_clear_message(
    argv: list[str],
    message: str,
    specs: list[tuple[StudySpec, bool, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert specs == []


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ttf", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--size",
        "--optimizers",
        "--seeds",
        "--lrs",
        "--weight-decay",
        "--workers",
        "--damping",
        "--damping-mode",
        "--cov-every",
        "--inverse-every",
        "--sigma-ema-decay",
        "--ema-decays",
        "--schedule",
        "--warmup",
        "--epochs",
    ):
        assert option in out
    assert "'all'" in out and "summary.md" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "ttf" in capsys.readouterr().out


def test_version_through_python_dash_m() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "beyondloss", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert completed.stdout.strip() == f"beyondloss {__version__}"


def test_posthoc_command_is_wired_and_validates_its_dataset(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["posthoc", "cifar10"])
    assert exit_info.value.code == 2
    assert "digits" in capsys.readouterr().err


def test_an_unreachable_ray_address_fails_at_once_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "out"
    argv = ["study", "lorenz", "--executor", "ray", "--address", "127.0.0.1:1", "--out", str(out)]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("beyondloss study: cannot reach the Ray cluster: nothing answers")
    assert error.count("\n") == 1 and not out.exists()
