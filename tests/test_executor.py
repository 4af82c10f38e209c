"""The local executor returns results in call order, in a pool or in this process."""

from __future__ import annotations

import pytest

from beyondloss.study.executor import LocalExecutor


def square(x: int) -> int:
    return x * x


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


@pytest.mark.parametrize("workers", [0, 2])
def test_results_come_back_in_call_order(workers: int) -> None:
    with LocalExecutor(workers) as executor:
        calls = [(square, x) for x in range(5)]
        assert executor.run(calls, [str(x) for x in range(5)], "squares", progress=False) == [
            0, 1, 4, 9, 16
        ]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failure_names_its_call(workers: int) -> None:
    with pytest.raises(RuntimeError, match="squares three failed: bad 3"):
        with LocalExecutor(workers) as executor:
            executor.run([(square, 1), (fail, 3)], ["one", "three"], "squares", progress=False)


def test_workers_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        LocalExecutor(-1)
