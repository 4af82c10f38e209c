"""The study engine stays readable: no function in ``beyondloss.study`` over 80 lines of code
(its docstring not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

import beyondloss.study

LIMIT = 80


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_in_the_study_engine_is_longer_than_80_lines() -> None:
    package = Path(beyondloss.study.__file__).parent
    long = [
        f"{path.name}:{node.name} ({_code_lines(node)} lines)"
        for path in sorted(package.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > LIMIT
    ]
    assert long == []
