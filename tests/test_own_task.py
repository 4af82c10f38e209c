"""A user's own task and optimizer, by reference, with no change to the package: through the
CLI from another folder (spawned workers), the Python API, Ray, export and ``load_model`` in a
fresh process; the task's fingerprint in run identity; the task contract's one-line errors."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from beyondloss.optim.factory import make_optimizer, parse_optimizer
from beyondloss.references import UnresolvedReference, resolve
from beyondloss.study import StudySpec, run_study
from beyondloss.study.ttf import pending_runs, run_job
from beyondloss.tasks import TASKS, ReferencedTask, check_task, fingerprint, task_factory

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"
STUDY = ["--lrs", "1e-2", "--seeds", "2", "--out", "out"]
OPTIMIZERS = ["--optimizers", "adamw,nesterov=my_optimizer.py:make_nesterov"]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the package holding the tutorial's task and optimizer files."""
    for name in ("my_task.py", "my_optimizer.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path


def _cli(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "beyondloss", *argv]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_an_outside_task_and_optimizer_run_export_and_reload_from_another_folder(
    outside: Path,
) -> None:
    study = _cli(outside, "study", "my_task.py:make_task", *OPTIMIZERS, *STUDY, "--no-progress")
    study = study.stdout
    assert "runs trained: 4" in study and "| nesterov | 0.01 | 2 |" in study
    export = [*OPTIMIZERS, *STUDY, "--optimizer", "nesterov"]
    shown = _cli(outside, "export", "--task", "my_task.py:make_task", *export, "-o", "m.pt")
    assert "DIFFERS" not in shown.stdout and "(nesterov, lr 0.01;" in shown.stdout
    reload = (
        "import json, torch; from beyondloss.study.export import load_model; "
        "torch.set_num_threads(1); task, model, selected = load_model('m.pt'); "
        "print(json.dumps([type(task).__name__, selected['stored'], task.evaluate(model)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", reload], cwd=outside, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    name, stored, rebuilt = json.loads(done.stdout)
    assert name == "PendulumForecast" and stored == rebuilt
    runs = _cli(outside, "runs", "--out", "out", "--where", "optimizer=nesterov", "--csv",
                "--columns", "task,optimizer_reference,task_reference")  # fmt: skip
    rows = runs.stdout.strip().splitlines()
    assert len(rows) == 3
    assert rows[1].startswith("make_task-") and f"{outside / 'my_optimizer.py'}:make_nesterov" in (
        rows[1]
    )
    assert rows[1].endswith(f"{outside / 'my_task.py'}:make_task")


def test_a_changed_task_gets_new_runs_and_a_changed_registry_task_is_refused(
    outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(outside)
    spec = StudySpec("my_task.py:make_task", optimizers=("adamw",), lrs=(1e-2,), seeds=1,
                     workers=1, out=outside / "out")  # fmt: skip
    assert spec.task == f"{outside / 'my_task.py'}:make_task"
    first = run_study(spec, progress=False)
    source = (outside / "my_task.py").read_text()
    (outside / "my_task.py").write_text(source.replace("4 if size", "5 if size"))
    changed = replace(spec, task="my_task.py:make_task")
    assert changed.task_label != spec.task_label  # a new fingerprint, so new run ids
    assert run_study(changed, progress=False).trained != first.trained
    # A registered task changed in place keeps its name: its old runs are refused, not reused.
    monkeypatch.setitem(TASKS, "mine", ReferencedTask(spec.task))
    registered = StudySpec("mine", optimizers=("adamw",), lrs=(1e-2,), seeds=1, workers=1,
                           out=outside / "out")  # fmt: skip
    run_study(registered, progress=False)
    (outside / "my_task.py").write_text(source)
    monkeypatch.setitem(TASKS, "mine", ReferencedTask(spec.task))
    again = replace(registered)
    with pytest.raises(ValueError, match="was trained on another definition of task mine"):
        pending_runs([run_job(again, "adamw", 1e-2, 0)])


def test_references_resolve_modules_files_and_installed_plugins(
    outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve("json:loads", "g", "task") is json.loads
    factory = resolve(f"{outside / 'my_task.py'}:make_task", "g", "task")
    assert factory("quick", 0).name == "pendulum-forecast"
    plugin = importlib.metadata.EntryPoint("mine", "json:dumps", "beyondloss.tasks")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [plugin])
    assert resolve("mine", "beyondloss.tasks", "task") is json.dumps
    with pytest.raises(UnresolvedReference, match="unknown task 'yours': choose from a, mine"):
        resolve("yours", "beyondloss.tasks", "task", ("a",))
    bad = outside / "bad_task.py"
    source = (outside / "my_task.py").read_text()
    bad.write_text(source.replace('= "steps_in_tolerance"', '= "mse"', 1))
    with pytest.raises(ValueError, match="primary_metric 'mse' is not in higher_is_better"):
        StudySpec(f"{bad}:make_task")  # checked when the spec is made, before anything runs
    label, reference = parse_optimizer(f"{outside / 'my_optimizer.py'}:make_nesterov")
    assert label == "make_nesterov"
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(reference, model, lr=0.1, weight_decay=0.0)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]


class _Good:
    name = "good"
    primary_metric = "score"
    higher_is_better = {"score": True}
    epochs, batch_size = 2, 8

    def splits(self): ...
    def make_model(self): ...
    def loss(self, model, batch): ...
    def evaluate(self, model, split="test", primary_only=False): ...


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0"),
        ({"primary_metric": "loss"}, "primary_metric 'loss' is not in higher_is_better (score)"),
        ({"higher_is_better": {"score": 1}}, "higher_is_better must map metric names to True"),
        ({"evaluate": None}, "evaluate must be methods"),
    ],
)
def test_check_task_names_the_missing_piece(change: dict, message: str) -> None:
    check_task(_Good())
    task = type("Bad", (_Good,), change)()
    with pytest.raises(ValueError, match="^the task \\(Bad\\)") as error:
        check_task(task)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_task_lists_what_a_task_lacks_and_fingerprints_follow_the_definition() -> None:
    class Partial:
        name = "partial"

    with pytest.raises(ValueError, match="lacks primary_metric, higher_is_better, epochs"):
        check_task(Partial())
    assert fingerprint(task_factory("lorenz")("quick", 0)) == fingerprint(
        task_factory("lorenz")("quick", 0)
    )
    assert fingerprint(task_factory("lorenz")("quick", 0)) != fingerprint(
        task_factory("lorenz")("full", 0)
    )
