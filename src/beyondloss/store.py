"""Embedded results store on SQLite: one row per run, one row per (run, epoch, metric).

Schema
------
``runs(run_id PK, task, optimizer, lr, weight_decay, seed, config JSON, status, created)``
    ``status`` is ``'running'`` until :meth:`ResultsStore.mark_complete`; ``created`` is an
    ISO-8601 UTC timestamp.
``metrics(run_id, epoch, name, value, PK(run_id, epoch, name))``
    Long format. Rows are written with ``INSERT OR REPLACE``, so an epoch redone after a crash
    overwrites its earlier values instead of duplicating them.
``artifacts(run_id, name, path, epoch, bytes, sha256, contents JSON, PK(run_id, name))``
    Files a run leaves behind, e.g. its final ``checkpoint`` (model, optimizer, and the states
    of its evaluators: weight averages, tracked logits). ``path`` is relative to the store's
    folder when the file lies under it, so a study folder can be moved as a whole; ``sha256``
    lets a reader check that the file is the one the run's metrics came from.

The database runs in WAL mode with a busy timeout, so several processes on one machine (one
:class:`ResultsStore` each) may read and write the same file at once. A store object owns one
connection; do not share it across threads or forked processes, open a new one there. SQLite
is not safe on network file systems: a study therefore writes its store from one process (the
driver, on one machine) and its workers, wherever they run, return a :class:`RunRecord` that the
driver writes with :meth:`ResultsStore.record`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

_MISSING = object()

RUN_COLUMNS = ("run_id", "task", "optimizer", "lr", "weight_decay", "seed", "status")
"""Columns of the ``runs`` table that :meth:`ResultsStore.runs` accepts as filters."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    task         TEXT NOT NULL,
    optimizer    TEXT NOT NULL,
    lr           REAL NOT NULL,
    weight_decay REAL NOT NULL,
    seed         INTEGER NOT NULL,
    config       TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('running', 'complete')),
    created      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    epoch  INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL,  -- NULL stands for NaN, which SQLite cannot store, and ±inf are kept as is
    PRIMARY KEY (run_id, epoch, name)
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id   TEXT NOT NULL REFERENCES runs (run_id),
    name     TEXT NOT NULL,
    path     TEXT NOT NULL,
    epoch    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    sha256   TEXT NOT NULL,
    contents TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""


STORE_NAME = "beyondloss.db"
"""File name of a study's results store inside its output folder."""


def check_output_folder(out: str | os.PathLike[str]) -> None:
    """Raise :class:`StoreError` unless a study can write its store and reports under ``out``,
    before anything is written: ``out`` is a folder or can be made one, it is writable, and any
    store already in it is a results store that can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"output folder {out} is a file, not a folder")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise StoreError(f"cannot make the output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to the output folder {out}: {existing} is read-only")
    store = out / STORE_NAME
    if store.exists():
        if not os.access(store, os.W_OK):  # checked before SQLite adds its -wal file
            raise StoreError(f"cannot write the results store {store}: it is read-only")
        ResultsStore(store).close()


SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of a store written by this version."""


class StoreError(RuntimeError):
    """A results store that cannot be opened as asked: missing, not SQLite, not a results store,
    or not writable. The message names the file and the cause in one line."""


def _explain(path: str, error: sqlite3.DatabaseError) -> str:
    """One line for an SQLite error met while opening ``path``."""
    text = str(error)
    if "not a database" in text:
        return f"{path} is not a results store (not an SQLite database)"
    if "readonly" in text:
        return f"cannot write the results store {path}: it is read-only"
    if "unable to open" in text:
        return f"cannot open the results store {path}: no such folder, or no permission"
    return f"cannot open the results store {path}: {text}"


class ResultsStore:
    """Results of training runs in one SQLite file.

    Parameters
    ----------
    path:
        Database file; created with its tables if missing, reopened as is otherwise.
    busy_timeout:
        Seconds a write waits for another process's lock before raising
        ``sqlite3.OperationalError``.
    readonly:
        Open an existing store for reading only (``runs``, reports, export): nothing is
        created or written, and a read-only file or folder is fine.

    Raises :class:`StoreError` when the file is missing (``readonly``), not an SQLite
    database, not a results store, or not writable (unless ``readonly``).
    """

    def __init__(
        self, path: str | os.PathLike[str], busy_timeout: float = 60.0, *, readonly: bool = False
    ) -> None:
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._open_readonly(busy_timeout) if readonly else self._open(busy_timeout)
        except sqlite3.DatabaseError as error:
            self.close()
            raise StoreError(_explain(self.path, error)) from None

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        """Open for writing, creating the tables; writing ``user_version`` up front makes a
        read-only file fail here, before any run is trained, not at the first result."""
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return self._conn

    def _open_readonly(self, busy_timeout: float) -> sqlite3.Connection:
        """Open an existing store without writing anything, even where its folder is
        read-only (SQLite then cannot make the WAL index: the file is read as immutable)."""
        if not os.path.isfile(self.path):
            raise StoreError(f"no results store at {self.path}")
        uri = Path(self.path).resolve().as_uri()
        try:
            connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy_timeout)
            connection.execute("SELECT 1 FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            connection = sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=busy_timeout)
        connection.row_factory = sqlite3.Row
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if not {"runs", "metrics", "artifacts"} <= tables:
            connection.close()
            raise StoreError(f"{self.path} is an SQLite file but not a results store")
        return connection

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taking the write lock up front so it never fails half-way."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def add_run(
        self,
        run_id: str,
        *,
        task: str,
        optimizer: str,
        lr: float,
        weight_decay: float,
        seed: int,
        config: Mapping[str, Any] | None = None,
    ) -> bool:
        """Register a run with status ``'running'``; return whether it was new.

        Re-adding an existing run with identical fields is a no-op (returns ``False``, status
        unchanged), so a resumed job can call this unconditionally. ``config`` must be
        JSON-serialisable. Raises ``ValueError`` if ``run_id`` exists with different fields.
        """
        fields = _run_fields(task, optimizer, lr, weight_decay, seed, config)
        with self._write():
            return self._insert_run(run_id, fields)

    def _insert_run(self, run_id: str, fields: Mapping[str, Any]) -> bool:
        """:meth:`add_run` inside the caller's write transaction."""
        row = self._conn.execute(
            "SELECT task, optimizer, lr, weight_decay, seed, config FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is not None:
            if dict(row) != fields:
                raise ValueError(
                    f"run {run_id!r} already exists with different fields: "
                    f"stored {dict(row)}, given {dict(fields)}"
                )
            return False
        self._conn.execute(
            "INSERT INTO runs (run_id, task, optimizer, lr, weight_decay, seed, config,"
            " status, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
            (run_id, *fields.values(), datetime.now(UTC).isoformat()),
        )
        return True

    def record(self, run: RunRecord) -> None:
        """Write a finished run in one transaction: its registration (as :meth:`add_run`), the
        metrics of each of its epochs (replacing any rows the run had), its artifacts, and
        status ``'complete'``. A process killed during the call leaves the run as it was.

        This is how a study's driver, the store's one writer, stores what its workers return:
        recording the same run twice leaves the same rows (but the first ``created``).
        """
        fields = _run_fields(
            run.task, run.optimizer, run.lr, run.weight_decay, run.seed, run.config
        )
        with self._write():
            self._insert_run(run.run_id, fields)
            self._conn.execute("DELETE FROM metrics WHERE run_id = ?", (run.run_id,))
            for epoch, metrics in run.epochs:
                self._insert_metrics(run.run_id, epoch, metrics)
            for artifact in run.artifacts:
                self._insert_artifact(run.run_id, artifact)
            self._conn.execute(
                "UPDATE runs SET status = 'complete' WHERE run_id = ?", (run.run_id,)
            )

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        """Write ``metrics`` of ``epoch`` (1-based) in one transaction, replacing earlier values.

        The name ``'epoch'`` is reserved (it is the row's key). Raises ``KeyError`` for an
        unknown run.
        """
        if "epoch" in metrics:
            raise ValueError("'epoch' is a reserved metric name; pass it as the epoch argument")
        with self._write():
            self._require_run(run_id)
            self._insert_metrics(run_id, epoch, metrics)

    def _insert_metrics(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO metrics (run_id, epoch, name, value) VALUES (?, ?, ?, ?)",
            [(run_id, int(epoch), name, float(value)) for name, value in metrics.items()],
        )

    def mark_complete(self, run_id: str) -> None:
        """Set the run's status to ``'complete'``. Raises ``KeyError`` for an unknown run."""
        with self._write():
            self._require_run(run_id)
            self._conn.execute("UPDATE runs SET status = 'complete' WHERE run_id = ?", (run_id,))

    def add_artifact(
        self,
        run_id: str,
        name: str,
        path: str | os.PathLike[str],
        epoch: int,
        contents: Sequence[str] = (),
    ) -> Artifact:
        """Register (or replace) the file ``path`` as artifact ``name`` of ``run_id``, written
        at ``epoch``; ``contents`` names what it holds. Its size and SHA-256 are recorded now.
        Raises ``KeyError`` for an unknown run, ``FileNotFoundError`` for a missing file."""
        artifact = Artifact.of(name, path, epoch, contents)
        with self._write():
            self._require_run(run_id)
            self._insert_artifact(run_id, artifact)
        return artifact

    def _insert_artifact(self, run_id: str, artifact: Artifact) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO artifacts (run_id, name, path, epoch, bytes, sha256,"
            " contents) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                run_id, artifact.name, self._relative(artifact.path), artifact.epoch,
                artifact.bytes, artifact.sha256, json.dumps(list(artifact.contents)),
            ),
        )

    def artifacts(self, run_id: str) -> dict[str, Artifact]:
        """The registered artifacts of ``run_id`` by name (empty if none or an unknown run),
        with absolute paths."""
        rows = self._conn.execute(
            "SELECT * FROM artifacts WHERE run_id = ? ORDER BY name", (run_id,)
        ).fetchall()
        folder = Path(self.path).resolve().parent
        return {
            row["name"]: Artifact(
                row["name"], folder / row["path"], row["epoch"], row["bytes"], row["sha256"],
                tuple(json.loads(row["contents"])),
            )
            for row in rows
        }

    def _relative(self, path: Path) -> str:
        """``path`` relative to the store's folder if it lies under it, else absolute."""
        folder = Path(self.path).resolve().parent
        return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)

    def is_complete(self, run_id: str) -> bool:
        """Whether the run exists and is marked complete."""
        row = self._conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None and row["status"] == "complete"

    def runs(self, **filters: Any) -> list[dict[str, Any]]:
        """Runs whose columns equal all ``filters`` (keys from :data:`RUN_COLUMNS`).

        Each run is a dict of the ``runs`` columns with ``config`` decoded from JSON, ordered by
        creation time then ``run_id``.
        """
        unknown = set(filters) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(
                f"unknown run filters {sorted(unknown)}; expected some of {', '.join(RUN_COLUMNS)}"
            )
        where = " AND ".join(f"{column} = ?" for column in filters) or "1"
        rows = self._conn.execute(
            f"SELECT * FROM runs WHERE {where} ORDER BY created, run_id", tuple(filters.values())
        ).fetchall()
        return [{**dict(row), "config": json.loads(row["config"])} for row in rows]

    def curves(self, run_id: str) -> dict[str, list[float]]:
        """The run's metrics as aligned per-epoch lists.

        Key ``'epoch'`` holds the logged epochs in ascending order; every metric's list has the
        same length, with NaN at epochs where that metric was not logged. Raises ``KeyError`` for
        an unknown run.
        """
        self._require_run(run_id)
        rows = self._conn.execute(
            "SELECT epoch, name, value FROM metrics WHERE run_id = ? ORDER BY epoch, name",
            (run_id,),
        ).fetchall()
        epochs = sorted({row["epoch"] for row in rows})
        position = {epoch: i for i, epoch in enumerate(epochs)}
        curves: dict[str, list[float]] = {"epoch": [float(epoch) for epoch in epochs]}
        for row in rows:
            values = curves.setdefault(row["name"], [math.nan] * len(epochs))
            values[position[row["epoch"]]] = math.nan if row["value"] is None else row["value"]
        return curves

    def to_frame(self) -> pd.DataFrame:
        """All metric rows in long format joined with their run's columns (needs pandas).

        Columns: ``run_id, task, optimizer, lr, weight_decay, seed, status, config, epoch, name,
        value``; ``config`` stays a JSON string.
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("ResultsStore.to_frame needs pandas: pip install pandas") from error
        return pd.read_sql_query(
            "SELECT r.run_id, r.task, r.optimizer, r.lr, r.weight_decay, r.seed, r.status,"
            " r.config, m.epoch, m.name, m.value"
            " FROM metrics AS m JOIN runs AS r USING (run_id)"
            " ORDER BY r.created, r.run_id, m.epoch, m.name",
            self._conn,
        )

    def final_frame(self, **filters: Any) -> pd.DataFrame:
        """One row per run: its columns, every key of its config as an axis (flattened, see
        :func:`flatten`: ``study``, ``size``, ``dopr.cov_every``, ``transforms``, ...) and the
        last logged value of every metric (needs pandas).

        ``filters`` keep the runs whose column or config axis equals the value (a run without
        the axis does not match), so every grid axis is queryable, not only lr, weight decay
        and seed. A filter on an axis that no run has raises ``ValueError`` naming the axes
        there are, so a misspelt axis cannot silently match nothing.
        """
        try:
            import pandas as pd
        except ImportError as error:
            message = "ResultsStore.final_frame needs pandas: pip install pandas"
            raise ImportError(message) from error
        rows, axes = [], set(RUN_COLUMNS)
        for run in self.runs():
            row = {key: value for key, value in run.items() if key != "config"}
            row |= {k: v for k, v in flatten(run["config"]).items() if k not in row}
            axes |= set(row)
            if all(row.get(key, _MISSING) == value for key, value in filters.items()):
                rows.append(row)
        unknown = sorted(set(filters) - axes)
        if unknown:
            names = ", ".join(sorted(axes))
            raise ValueError(f"no run has the axes {unknown}; the axes are {names}")
        finals = self._conn.execute(
            "SELECT m.run_id, m.name, m.value FROM metrics AS m JOIN ("
            " SELECT run_id, name, MAX(epoch) AS epoch FROM metrics GROUP BY run_id, name"
            ") AS last USING (run_id, name, epoch)"
        ).fetchall()
        values: dict[str, dict[str, float]] = {}
        for final in finals:
            value = math.nan if final["value"] is None else final["value"]
            values.setdefault(final["run_id"], {})[final["name"]] = value
        for row in rows:
            row |= values.get(row["run_id"], {})
        return pd.DataFrame(rows)

    def _require_run(self, run_id: str) -> None:
        if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise KeyError(f"unknown run {run_id!r}; register it with add_run first")


@dataclass(frozen=True)
class Artifact:
    """A file registered for a run (see the module's schema); ``path`` is absolute."""

    name: str
    path: Path
    epoch: int
    bytes: int
    sha256: str
    contents: tuple[str, ...]

    @classmethod
    def of(
        cls, name: str, path: str | os.PathLike[str], epoch: int, contents: Sequence[str] = ()
    ) -> Artifact:
        """The artifact ``name`` for the file at ``path`` as it is now (its size and SHA-256).
        Raises ``FileNotFoundError`` for a missing file."""
        return cls(
            name, Path(path).resolve(), int(epoch), os.path.getsize(path), sha256(path),
            tuple(contents),
        )

    def verify(self) -> None:
        """Raise ``FileNotFoundError`` if the file is gone, ``ValueError`` if its content is
        not the registered one (another run wrote over it, or it was edited)."""
        if not self.path.exists():
            raise FileNotFoundError(f"artifact {self.name} is missing: {self.path}")
        if sha256(self.path) != self.sha256:
            raise ValueError(
                f"artifact {self.name} at {self.path} changed since it was registered "
                "(SHA-256 differs)"
            )


@dataclass(frozen=True)
class RunRecord:
    """A finished run as a worker hands it to the process that writes the store
    (:meth:`ResultsStore.record`): the fields of :meth:`ResultsStore.add_run`, each epoch's
    metrics as ``(epoch, {name: value})``, and the run's artifacts."""

    run_id: str
    task: str
    optimizer: str
    lr: float
    weight_decay: float
    seed: int
    config: Mapping[str, Any]
    epochs: tuple[tuple[int, Mapping[str, float]], ...]
    artifacts: tuple[Artifact, ...] = ()


def _run_fields(
    task: str,
    optimizer: str,
    lr: float,
    weight_decay: float,
    seed: int,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A run's columns as the ``runs`` table holds them."""
    return {
        "task": task,
        "optimizer": optimizer,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "config": json.dumps(dict(config or {}), sort_keys=True),
    }


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` with nested mappings flattened to dotted keys (``{"dopr": {"cov_every": 10}}``
    → ``{"dopr.cov_every": 10}``); lists become comma-separated strings, so every value is a
    scalar a table or a filter can hold."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value
    return flat
