"""Reward functions in TRL's signature: weighted sums, None, misaligned columns, bad returns."""

from __future__ import annotations

from typing import Any

import datasets
import pytest

from autolayer.errors import AutolayerError
from autolayer.rewards import (
    RewardError,
    repeat_rows,
    resolve_callable,
    reward_identity,
    score_completions,
)
from autolayer.tasks import Task

# --- score_completions and repeat_rows --------------------------------------------------------


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

    from autolayer.rewards import check_rewards

    with pytest.raises(AutolayerError, match=message):
        check_rewards(replace(_held_out(), reward_funcs=funcs))
    # None where a reward does not apply is TRL's convention: a number elsewhere is enough
    check_rewards(replace(_held_out(), reward_funcs=(reward_none, reward_empty_only)))


def test_score_completions_rejects_misaligned_columns() -> None:
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        score_completions(_task(reward_len), ["p", "p"], ["c", "d"], {"answer": ["1"]})


def test_repeat_rows_is_prompt_major() -> None:
    batch = {"prompt": ["a", "b"], "answer": ["1", "2"]}
    assert repeat_rows(batch, 3) == {
        "prompt": ["a", "a", "a", "b", "b", "b"],
        "answer": ["1", "1", "1", "2", "2", "2"],
    }
    with pytest.raises(ValueError):
        repeat_rows(batch, 0)


def test_resolve_callable_takes_dotted_and_file_paths(tmp_path: Any) -> None:
    from autolayer import organism

    assert resolve_callable("autolayer.organism.reward_correct", "r") is organism.reward_correct
    assert resolve_callable("autolayer.organism:reward_correct", "r") is organism.reward_correct
    (tmp_path / "mine.py").write_text("def f(completions, **kw):\n    return [1.0]\n")
    assert resolve_callable(f"{tmp_path / 'mine.py'}:f", "r")(["x"]) == [1.0]
    with pytest.raises(AutolayerError, match="importing .* raised"):
        (tmp_path / "bad.py").write_text("raise RuntimeError('no')\n")
        resolve_callable(f"{tmp_path / 'bad.py'}:f", "r")


def test_reward_identity_follows_the_source() -> None:
    assert reward_identity(reward_len) == reward_identity(reward_len)
    assert reward_identity(reward_len) != reward_identity(reward_match)
    assert reward_identity(reward_len).split("@")[0].endswith("test_rewards.reward_len")
