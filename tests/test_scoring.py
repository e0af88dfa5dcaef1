from pathlib import Path

import pytest
import torch

from autolayer.config import TaskConfig
from autolayer.models import load_model
from autolayer.scoring import Evaluation, ScoreCache, contribution, eval_fingerprint, evaluate
from autolayer.tasks import load_task


def ev(*outcomes: float) -> Evaluation:
    return Evaluation.from_outcomes(outcomes)


def test_contribution_point_estimate_and_paired_ci() -> None:
    # 10 prompts. base solves 2, full solves 8, subset solves 6 (a superset of base's):
    # C = (0.6 - 0.2) / (0.8 - 0.2) = 0.4 / 0.6 = 0.667
    base = ev(1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    full = ev(1, 1, 1, 1, 1, 1, 1, 1, 0, 0)
    subset = ev(1, 1, 1, 1, 1, 1, 0, 0, 0, 0)
    c = contribution(subset, base, full, seed=0)
    assert c.value == pytest.approx(2 / 3)
    assert c.gain == pytest.approx(0.4) and c.full_gain == pytest.approx(0.6)
    assert c.low is not None and c.high is not None
    assert c.low < 2 / 3 < c.high
    assert c.low >= 0.0 and c.high <= 1.0  # subset never beats full on any prompt here


def test_contribution_can_exceed_one_and_go_negative() -> None:
    base = ev(*[1] * 20 + [0] * 80)
    full = ev(*[1] * 50 + [0] * 50)
    better = ev(*[1] * 60 + [0] * 40)
    worse = ev(*[1] * 10 + [0] * 90)
    assert contribution(better, base, full).value == pytest.approx((0.6 - 0.2) / 0.3)
    assert contribution(worse, base, full).value == pytest.approx((0.1 - 0.2) / 0.3)


def test_contribution_is_undefined_when_the_full_gain_is_noise() -> None:
    # full differs from base on 2 of 10 prompts, one each way: gain 0, within noise
    base = ev(1, 0, 1, 0, 1, 0, 1, 0, 1, 0)
    full = ev(0, 1, 1, 0, 1, 0, 1, 0, 1, 0)
    c = contribution(ev(*[1] * 10), base, full)
    assert c.value is None and c.low is None and c.high is None
    assert "within noise" in c.reason
    assert str(c).startswith("undefined")


def test_contribution_needs_the_same_prompts() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        contribution(ev(1, 0), ev(1, 0, 1), ev(1, 1))


def test_stderr_matches_the_binomial_formula() -> None:
    e = ev(*[1] * 50 + [0] * 50)
    # sample std with ddof=1: sqrt(0.25 * 100/99) / sqrt(100) = 0.05025
    assert e.stderr == pytest.approx(0.0502519, abs=1e-6)


def test_score_cache_round_trips_and_ignores_corrupt_entries(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", ev(1, 0, 1))
    assert cache.get("k") == ev(1, 0, 1)
    (tmp_path / "k.json").write_text("{not json")
    assert cache.get("k") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_greedy_evaluation_is_repeatable_and_fingerprinted() -> None:
    model, tokenizer = load_model("organism", device="cpu")
    task = load_task(TaskConfig(eval_size=100), tokenizer)
    first, second = evaluate(model, tokenizer, task), evaluate(model, tokenizer, task, batch_size=7)
    assert first == second  # greedy, and batching does not change any answer
    assert len(first.outcomes) == 100 and set(first.outcomes) <= {0.0, 1.0}
    other = load_task(TaskConfig(eval_size=100, seed=1), tokenizer)
    key = eval_fingerprint("organism", None, model, tokenizer, task)
    assert key == eval_fingerprint("organism", None, model, tokenizer, task)
    assert key != eval_fingerprint("organism", None, model, tokenizer, other)
    assert key != eval_fingerprint("organism", "v2", model, tokenizer, task)
    longer = load_task(TaskConfig(eval_size=100, max_completion_length=6), tokenizer)
    assert key != eval_fingerprint("organism", None, model, tokenizer, longer)
    stops = load_task(TaskConfig(eval_size=100, stop_strings=["9"]), tokenizer)
    assert key != eval_fingerprint("organism", None, model, tokenizer, stops)
    reward = load_task(
        TaskConfig(eval_size=100, reward_funcs=["autolayer.coding.passes_tests"]), tokenizer
    )
    assert key != eval_fingerprint("organism", None, model, tokenizer, reward)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert key != eval_fingerprint("organism", None, model, tokenizer, task)
    assert key != eval_fingerprint("organism", None, model.to(torch.bfloat16), tokenizer, task)


def test_a_zero_width_interval_says_what_happened() -> None:
    """0.000 -> 0.000 once printed as 'C 0.00 [0.00, 0.00]', an interval that looks certain."""
    from autolayer.estimate import format_contribution

    assert format_contribution(0.0, 0.0, 0.0, 0.0) == "no change"
    assert format_contribution(1.0, 1.0, 1.0, 0.3) == "1.00 [no spread]"
    assert format_contribution(0.5, 0.4, 0.6, 0.1) == "0.50 [0.40, 0.60]"
    base, full = ev(0, 1, 0, 1, 0, 0, 0, 0), ev(1, 1, 1, 1, 1, 1, 1, 1)
    assert str(contribution(base, base, full)) == "no change"
