"""Make ``torch.compile`` see the preconditioner's hooks, without importing the compiler.

Dynamo does not guard on module hooks by default (``skip_nnmodule_hook_guards``): a model
compiled before its preconditioner was built — or another instance of the same class compiled
earlier, whose graph dynamo reuses — runs compiled code that skips the recording hooks, and AP
silently gets no statistics. :func:`guard_module_hooks` turns those guards on, so adding or
removing hooks recompiles once instead:

* if ``torch._dynamo`` is already imported, it sets the flag and resets dynamo's caches
  (graphs compiled without the guards are dropped and recompile on their next call);
* otherwise it does not import it — importing the compiler costs a second, and in DDP runs it
  makes gloo's process-group teardown deadlock now and then (``tests/test_dopr_distributed``)
  — but sets the flag the moment something else imports it, before anything is compiled.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

DYNAMO = "torch._dynamo"


def _set_guards(dynamo: ModuleType) -> bool:
    """Turn dynamo's hook guards on; whether they were off."""
    if not dynamo.config.skip_nnmodule_hook_guards:
        return False
    dynamo.config.skip_nnmodule_hook_guards = False
    return True


class _OnDynamoImport(importlib.abc.MetaPathFinder):
    """Finds ``torch._dynamo`` with the other finders and sets the guards once it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != DYNAMO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _set_guards(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def guard_module_hooks() -> None:
    """Make compiled code respect module hooks from now on (see the module docstring)."""
    dynamo = sys.modules.get(DYNAMO)
    if dynamo is not None:
        if _set_guards(dynamo):
            dynamo.reset()
    elif not any(isinstance(finder, _OnDynamoImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OnDynamoImport())
