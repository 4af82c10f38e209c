"""References to a user's own code: how a task or an optimizer that is not built in gets into a
study, a worker, an export and a fresh process.

A reference is text, so it pickles as text and every process resolves it itself (a spawned
worker, a Ray task, a DDP rank, :func:`~beyondloss.study.export.load_model` in a new
interpreter); nothing but the string has to travel. Resolution order:

1. a name of the built-in registry (``lorenz``, ``adamw``; looked up by the caller);
2. a name an installed distribution declares in the entry-point group
   (``beyondloss.tasks`` / ``beyondloss.optimizers``, in ``pyproject.toml``:
   ``[project.entry-points."beyondloss.tasks"] mytask = "mypkg.tasks:make_task"``);
3. ``module.path:attribute``, imported with :func:`importlib.import_module` (the module must
   be importable in every process: installed, or on ``PYTHONPATH``);
4. ``path/to/file.py:attribute``, loaded from that file under a module name derived from its
   absolute path, so that classes defined there pickle (``torch.save``) and unpickle in any
   process that resolves the same reference. A relative path is resolved against the current
   folder once, by :func:`canonical`, so that the reference a study stores is absolute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UnresolvedReference(ValueError):
    """A reference that does not resolve; the message names the missing piece in one line."""


def is_reference(text: str) -> bool:
    """Whether ``text`` names code by ``module:attribute`` or ``file.py:attribute``."""
    return ":" in text


def canonical(text: str) -> str:
    """``text`` with a file path made absolute (module references and names as they are)."""
    if not is_reference(text):
        return text
    location, _, attribute = text.rpartition(":")
    if location.endswith(".py"):
        return f"{Path(location).expanduser().resolve()}:{attribute}"
    return text


def label(text: str) -> str:
    """A short name for ``text`` in run ids, folders and reports: a registered name itself, a
    reference's attribute (``mypkg.tasks:make_task`` → ``make_task``)."""
    return text.rpartition(":")[2] if is_reference(text) else text


def resolve(text: str, group: str, what: str, builtin: Sequence[str] = ()) -> Any:
    """The object ``text`` names, a plugin's name or a reference (the module's resolution
    order after the built-in names, which the caller looks up itself); raises
    :class:`UnresolvedReference` if there is none.

    ``group`` is the entry-point group, ``what`` ("task", "optimizer") names the kind of thing
    in messages, and ``builtin`` lists the built-in names that a message offers.
    """
    if not is_reference(text):
        plugins = importlib.metadata.entry_points(group=group)
        found = [point for point in plugins if point.name == text]
        if found:
            return found[0].load()
        names = ", ".join([*builtin, *(point.name for point in plugins)])
        raise UnresolvedReference(
            f"unknown {what} {text!r}: choose from {names}, or give module:factory or "
            "path/to/file.py:factory"
        )
    location, _, attribute = text.rpartition(":")
    if not location or not attribute:
        raise UnresolvedReference(
            f"{what} reference {text!r} must be module:factory or file.py:factory"
        )
    module = _load_file(location, what) if location.endswith(".py") else _import(location, what)
    try:
        return getattr(module, attribute)
    except AttributeError:
        message = f"{location} has no {attribute!r} (the {what} {text!r})"
        raise UnresolvedReference(message) from None


def _import(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise UnresolvedReference(
            f"cannot import {error.name!r} for the {what} {name!r}: install it or add its "
            "folder to PYTHONPATH"
        ) from None


def _load_file(location: str, what: str) -> Any:
    """The module of the file ``location`` under a name that depends only on its absolute path
    (``beyondloss_file_<hash>``), loaded once per process and again when the file changes
    (a notebook that edits a task file and reruns a study sees the edit, as its workers do)."""
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise UnresolvedReference(f"no file {path} for the {what} {location}")
    name = "beyondloss_file_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    source = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__beyondloss_source__", None) == source:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__beyondloss_source__ = source  # type: ignore[attr-defined]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def check_callable(factory: Any, text: str, what: str) -> Callable[..., Any]:
    """``factory`` if it is callable, else :class:`UnresolvedReference` naming ``text``."""
    if not callable(factory):
        kind = type(factory).__name__
        raise UnresolvedReference(f"the {what} {text!r} is a {kind}, not a factory")
    return factory
