"""Estimates over seeds and prompts, and the tied-best set (autolayer.estimate)."""

from __future__ import annotations

import numpy as np
import pytest

from autolayer.errors import AutolayerError
from autolayer.estimate import analyse, pooled_seed_variance
from autolayer.scoring import Evaluation, contribution

N = 1000


def binary(correct: int, n: int = N, offset: int = 0) -> np.ndarray:
    """n outcomes whose `correct` 1s start at `offset` (wrapping), so runs overlap in prompts."""
    out = np.zeros(n)
    out[(offset + np.arange(correct)) % n] = 1.0
    return out


def test_pooled_seed_variance_by_hand() -> None:
    runs = {
        "a": np.array([[1.0, 1.0], [0.0, 0.0]]),  # seed scores 1, 0: variance 0.5, 1 df
        "b": np.array([[1.0, 0.0], [1.0, 0.0]]),  # 0.5, 0.5: variance 0, 1 df
        "c": np.array([[1.0, 0.0]]),  # one seed: no df
    }
    assert pooled_seed_variance(runs) == (0.25, 2)


def test_one_seed_each_intervals_say_prompt_noise_only_and_a_clear_winner_stands_alone() -> None:
    base = binary(500)
    full = binary(800)[None]
    runs = {"weak": binary(600)[None], "strong": binary(850)[None]}
    a = analyse(runs, base, full)
    assert a.best == "strong" and a.tied == {"strong"}
    assert a.seed_df == 0 and "not included" in a.method
    assert a.estimates["strong"].contribution == pytest.approx((0.85 - 0.5) / 0.3)


def test_with_one_seed_the_c_interval_matches_the_prompt_bootstrap() -> None:
    base, full, sub = binary(500), binary(800, offset=100), binary(700, offset=300)
    mine = analyse({"s": sub[None]}, base, full[None]).estimates["s"]
    theirs = contribution(*(Evaluation.from_outcomes(x) for x in (sub, base, full)))
    assert mine.contribution == pytest.approx(theirs.value)
    assert mine.low == pytest.approx(theirs.low, abs=0.03)
    assert mine.high == pytest.approx(theirs.high, abs=0.03)


def test_paired_prompts_separate_a_small_consistent_gain() -> None:
    """B solves A's prompts plus 20 more: a 0.02 gain, but every differing prompt favours B."""
    a, b = binary(700), binary(720)
    result = analyse({"a": a[None], "b": b[None]}, binary(500), None)
    assert result.best == "b" and result.tied == {"b"}


def test_seed_noise_ties_what_prompt_noise_alone_separates() -> None:
    """Same means as above, but each candidate's seeds scatter by +-0.05: no longer separable."""
    a = np.stack([binary(650), binary(750), binary(700)])
    b = np.stack([binary(670), binary(770), binary(720)])
    result = analyse({"a": a, "b": b}, binary(500), None)
    assert result.best == "b" and result.tied == {"a", "b"}
    assert result.seed_df == 4 and result.seed_sd == pytest.approx(0.05)
    assert "training-seed term" in result.method
    e = result.estimates["b"]
    assert e.seeds == 3 and e.score == pytest.approx(0.72)
    assert e.score_high - e.score_low > 2 * 1.96 * 0.05 / np.sqrt(3) * 0.8  # seed term is in


def test_a_candidate_run_once_borrows_the_pooled_seed_noise() -> None:
    repeated = np.stack([binary(650), binary(750)])  # seed sd 0.0707
    once = binary(700)[None]
    result = analyse({"r": repeated, "once": once}, binary(500), None)
    e = result.estimates["once"]
    assert e.score_high - e.score_low > 2 * 1.96 * 0.07 * 0.8  # far wider than prompts alone


def test_runs_on_different_prompts_are_refused() -> None:
    with pytest.raises(AutolayerError, match="same held-out prompts"):
        analyse({"a": np.ones((1, 10))}, np.ones(12), None)


def test_c_is_left_out_when_undefined() -> None:
    result = analyse(
        {"a": binary(700)[None]}, binary(500), binary(800)[None], contribution_defined=False
    )
    assert result.estimates["a"].contribution is None and result.estimates["a"].low is None
