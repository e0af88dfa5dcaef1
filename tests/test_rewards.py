"""Reward functions in TRL's signature: rows repeated per generation, finding one by its path,
and its identity."""

from __future__ import annotations

from typing import Any

import pytest

from autolayer.errors import AutolayerError
from autolayer.rewards import repeat_rows, resolve_callable, reward_identity


def reward_zero(completions: list[str], **kwargs: Any) -> list[float]:
    return [0.0 for _ in completions]


def reward_one(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0 for _ in completions]


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
    assert reward_identity(reward_zero) == reward_identity(reward_zero)
    assert reward_identity(reward_zero) != reward_identity(reward_one)
    assert reward_identity(reward_zero).split("@")[0].endswith("test_rewards.reward_zero")
