"""Held-out scoring and layer contributions.

Every candidate is scored on the same fixed held-out prompts with greedy decoding, so scores are
paired per prompt: `C = (S_subset - S_base) / (S_full - S_base)` (arXiv 2607.01232) gets a paired
bootstrap confidence interval from the per-prompt outcomes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from torch import nn

from autolayer.estimate import Z95, contribution_ratio, format_contribution
from autolayer.files import write_text_atomic
from autolayer.frozen import Frozen
from autolayer.rollout import complete, eos_token_ids
from autolayer.task_rewards import score_completions
from autolayer.tasks import Task, task_fingerprint


@dataclass(frozen=True)
class Evaluation:
    """A candidate's held-out result: the mean reward and the reward of every prompt, in order."""

    score: float
    outcomes: tuple[float, ...]

    @property
    def stderr(self) -> float:
        """Standard error of the score (sample std / sqrt(n))."""
        values = np.asarray(self.outcomes)
        return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0

    @classmethod
    def from_outcomes(cls, outcomes: Any) -> Evaluation:
        values = tuple(float(v) for v in outcomes)
        return cls(score=float(np.mean(values)), outcomes=values)


@dataclass(frozen=True)
class Contribution:
    """C with its paired-bootstrap CI; `value` is None when S_full - S_base is within noise."""

    value: float | None
    low: float | None
    high: float | None
    gain: float  # S_subset - S_base
    full_gain: float  # S_full - S_base
    reason: str = ""

    def __str__(self) -> str:
        if self.value is None or self.low is None or self.high is None:
            return f"undefined ({self.reason})"
        return format_contribution(self.value, self.low, self.high, self.gain)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    batch_size: int = 256,
    share_prompts: bool = True,
    frozen: Frozen | None = None,
) -> Evaluation:
    """Greedy-decode every held-out prompt and score it with the task's verifiable rewards.

    The prompts' common prefix (a system message, worked examples) is prefilled once per batch
    (`rollout.complete`; `share_prompts=False` prefills every prompt whole), with `frozen` from
    the layers below the trained ones as the study's store holds them. An environment
    task plays one greedy episode per held-out seed; its outcome is the return.
    """
    was_training = model.training
    model.eval()
    if task.env is not None:
        from autolayer.agent import play

        seeds = list(task.eval["seed"])
        episodes = play(model, tokenizer, task, seeds, range(len(seeds)), do_sample=False)
        model.train(was_training)
        return Evaluation.from_outcomes([e.total for e in episodes])
    outcomes: list[float] = []
    rows = task.eval.to_dict()
    prompts: list[Any] = rows["prompt"]
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        done = complete(model, tokenizer, task, chunk, share_prompts=share_prompts, frozen=frozen)
        columns = {k: v[start : start + batch_size] for k, v in rows.items() if k != "prompt"}
        outcomes += score_completions(task, chunk, done.texts, columns, done.ids)
    model.train(was_training)
    return Evaluation.from_outcomes(outcomes)


def paired_gain(a: Any, b: Any) -> tuple[float, float]:
    """Paired per-prompt mean difference a - b and its standard error."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def full_gain_noise(base: Evaluation, full: Evaluation) -> str:
    """Why C is undefined for these references, or "" when S_full - S_base is significant
    (its paired 95% CI excludes 0): a ratio over a noise-level denominator is meaningless."""
    b, f = (np.asarray(e.outcomes, dtype=float) for e in (base, full))
    full_gain, full_se = paired_gain(f, b)
    if full_gain == 0 or abs(full_gain) <= Z95 * full_se:
        return f"S_full - S_base = {full_gain:+.3f} is within noise (±{Z95 * full_se:.3f})"
    return ""


def contribution(
    subset: Evaluation,
    base: Evaluation,
    full: Evaluation,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Contribution:
    """C and a paired percentile-bootstrap CI over prompts.

    C is undefined when the full run's gain is not significant (its 95% CI includes 0): a ratio
    with a noise-level denominator would be meaningless. Percentile (not BCa) intervals, since the
    ratio can take extreme values in resamples whose denominator nears 0.
    """
    s, b, f = (np.asarray(e.outcomes, dtype=float) for e in (subset, base, full))
    if not len(s) == len(b) == len(f):
        raise ValueError("contribution needs evaluations on the same prompts")
    gain = subset.score - base.score
    full_gain = full.score - base.score
    reason = full_gain_noise(base, full)
    if reason:
        return Contribution(None, None, None, gain, full_gain, reason)

    def ratio(s_: np.ndarray, b_: np.ndarray, f_: np.ndarray, axis: int = -1) -> np.ndarray:
        denominator = f_.mean(axis) - b_.mean(axis)
        denominator = np.where(denominator == 0, np.finfo(float).tiny, denominator)
        return (s_.mean(axis) - b_.mean(axis)) / denominator

    result = stats.bootstrap(
        (s, b, f),
        ratio,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    value = contribution_ratio(subset.score, base.score, full.score)
    return Contribution(value, float(low), float(high), gain, full_gain)


@dataclass
class References:
    """The two evaluations C is measured against: the base model and the all-layers run."""

    base: Evaluation
    full: Evaluation

    @cached_property
    def full_gain_defined(self) -> bool:
        """Whether C is defined; asked on every pruning report, so computed once."""
        return not full_gain_noise(self.base, self.full)

    def uses_contribution(self, objective: str) -> bool:
        """Whether a search asked for `objective` (search.objective) maximises C: only where
        C is defined, else it falls back to the held-out score."""
        return objective == "contribution" and self.full_gain_defined

    def objective_value(self, score: float, objective: str) -> float:
        """What the search maximises for a held-out score: C when it uses C (an increasing map
        of the score), else the score itself."""
        if self.uses_contribution(objective):
            return contribution_ratio(score, self.base.score, self.full.score)
        return score


def eval_fingerprint(
    model_name: str, revision: str | None, model: nn.Module, tokenizer: Any, task: Task
) -> str:
    """Identifies everything that changes a base score: the model and its revision, the weights'
    dtype and device, the task's eval rows, reward functions (by source), lengths, stop strings
    and chat template, and the EOS ids decoding stops at. Greedy decoding is implied."""
    param = next(model.parameters())
    digest = hashlib.sha256()
    for part in (
        model_name,
        str(revision),
        str(param.dtype),
        param.device.type,
        json.dumps(eos_token_ids(model, tokenizer)),
        str(tokenizer.pad_token_id),
        task_fingerprint(task),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


class ScoreCache:
    """Per-prompt outcomes cached on disk as JSON, keyed by `eval_fingerprint` (plus a label)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Evaluation | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return Evaluation.from_outcomes(json.loads(path.read_text())["outcomes"])
        except (ValueError, KeyError):
            return None  # a corrupt cache entry is recomputed, not trusted

    def put(self, key: str, evaluation: Evaluation) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"score": evaluation.score, "outcomes": evaluation.outcomes})
        write_text_atomic(self._path(key), payload)  # readers never see half a file
