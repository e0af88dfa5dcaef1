"""A task's rewards applied: weighted sums, None, misaligned columns, bad returns, and the
check before training."""

from __future__ import annotations

from typing import Any

import datasets
import pytest

from autolayer.errors import AutolayerError
from autolayer.task_rewards import RewardError, check_rewards, score_completions
from autolayer.tasks import Task


def _task(*funcs: Any) -> Task:
    empty = datasets.Dataset.from_dict({"prompt": []})
    return Task("t", empty, empty, tuple(funcs), max_completion_length=4)


def reward_len(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def reward_match(
    completions: list[str], answer: list[str], prompts: list[str], **kw: Any
) -> list[float]:
    assert prompts == ["p1", "p1", "p2"]
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def reward_boom(completions: list[str], **kwargs: Any) -> list[float]:
    raise KeyError("missing")


def reward_short(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0]


def test_score_completions_sums_functions_over_aligned_columns() -> None:
    rows = {"answer": ["ab", "x", "cde"], "question": ["q1", "q1", "q2"]}
    scores = score_completions(
        _task(reward_len, reward_match), ["p1", "p1", "p2"], ["ab", "y", "cde"], rows
    )
    assert scores == [2.0 + 1.0, 1.0 + 0.0, 3.0 + 1.0]


def test_score_completions_names_a_failing_function() -> None:
    with pytest.raises(RewardError, match="reward function 'reward_boom' raised KeyError"):
        score_completions(_task(reward_len, reward_boom), ["p"], ["c"], {})
    with pytest.raises(RewardError, match="'reward_short' returned 1 rewards for 2 completions"):
        score_completions(_task(reward_short), ["p", "p"], ["c", "d"], {})


def reward_inf(completions: list[str], **kwargs: Any) -> list[float]:
    return [float("inf") if c == "0" else 0.0 for c in completions]


def reward_none(completions: list[str], **kwargs: Any) -> list[None]:
    return [None for _ in completions]


def reward_nan(completions: list[str], **kwargs: Any) -> list[float]:
    return [float("nan") for _ in completions]


def reward_empty_only(completions: list[str], **kwargs: Any) -> list[float | None]:
    return [1.0 if c == "" else None for c in completions]  # applies to empty answers only


def test_an_infinite_reward_names_its_function() -> None:
    with pytest.raises(RewardError, match="'reward_inf' returned inf; rewards must be finite"):
        score_completions(_task(reward_inf), ["p", "p"], ["1", "0"], {})


def _held_out(n: int = 3) -> Task:
    rows = datasets.Dataset.from_dict({"prompt": [f"{i}+1=" for i in range(n)]})
    return Task("t", rows, rows, (), max_completion_length=4)


@pytest.mark.parametrize(
    ("funcs", "message"),
    [
        ((reward_inf,), "'reward_inf' returned inf; rewards must be finite"),
        ((reward_none,), r"\('reward_none'\) returned None or NaN for all 4 completions"),
        ((reward_nan, reward_none), "'reward_nan', 'reward_none'\) returned None or NaN"),
    ],
)
def test_rewards_that_never_give_a_finite_number_are_refused_before_training(
    funcs: tuple[Any, ...], message: str
) -> None:
    from dataclasses import replace

    with pytest.raises(AutolayerError, match=message):
        check_rewards(replace(_held_out(), reward_funcs=funcs))
    # None where a reward does not apply is TRL's convention: a number elsewhere is enough
    check_rewards(replace(_held_out(), reward_funcs=(reward_none, reward_empty_only)))


def test_score_completions_rejects_misaligned_columns() -> None:
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        score_completions(_task(reward_len), ["p", "p"], ["c", "d"], {"answer": ["1"]})
