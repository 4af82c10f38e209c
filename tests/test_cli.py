"""Tests of the command line: parsing into a study spec, input validation, help and version."""

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
        "--no-progress",
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
        workers=1,
        out=Path("elsewhere"),
    )
    assert not progress
    assert command == "beyondloss ttf lorenz --size full --optimizers 'sgd, dopr-sgd' " + (
        "--seeds 2 --lrs 1e-3,3e-2 --weight-decay 0.01 --workers 1 --out elsewhere --no-progress"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["ttf", "lorentz"], "invalid choice: 'lorentz' (choose from 'lorenz')"),
        (["ttf", "lorenz", "--size", "huge"], "invalid choice: 'huge'"),
        (["ttf", "lorenz", "--optimizers", "adamw,adam"], "unknown optimizer 'adam' (choose from"),
        (["ttf", "lorenz", "--optimizers", ","], "at least one optimizer"),
        (["ttf", "lorenz", "--optimizers", "muon,muon"], "optimizers must be distinct"),
        (["ttf", "lorenz", "--lrs", "1e-3,fast"], "not a number: 'fast'"),
        (["ttf", "lorenz", "--lrs", "0"], "learning rates must be positive"),
        (["ttf", "lorenz", "--lrs", "1e-3,0.001"], "learning rates must be distinct"),
        (["ttf", "lorenz", "--seeds", "0"], "--seeds: must be at least 1"),
        (["ttf", "lorenz", "--seeds", "2.5"], "--seeds: not an integer"),
        (["ttf", "lorenz", "--workers", "0"], "--workers: must be at least 1"),
        (["ttf", "lorenz", "--weight-decay", "-1"], "--weight-decay: must be finite and >= 0"),
        (["ttf", "lorenz", "--bogus"], "unrecognized arguments: --bogus"),
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
    for option in ("--size", "--optimizers", "--seeds", "--lrs", "--weight-decay", "--workers"):
        assert option in out
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
