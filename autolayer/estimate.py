"""What a study's runs say about each candidate: score and C with intervals that include
training-seed noise, and the set of candidates tied with the best.

Every run of a study is scored on the same held-out prompts, so candidates are compared on paired
outcomes. One resample of the study:

1. draws the held-out prompts with replacement, the same draw for every run (pairing);
2. averages each candidate's outcomes over its training seeds on those prompts;
3. adds a normal training-seed term with variance `sigma2 / k` for a candidate run on k seeds,
   where `sigma2` is the between-seed variance of held-out scores pooled over every candidate run
   on at least two seeds (so a candidate measured once still carries seed noise). With few
   degrees of freedom that variance is itself uncertain, so each resample draws it from its
   scaled-inverse-chi-square distribution, `sigma2 * df / chi2(df)`, which gives the seed term
   Student-t tails instead of trusting 2 df as if they were known.

Intervals are percentiles of 2,000 such resamples. Pooling assumes seeds scatter scores about
equally for every candidate; it is what makes a seed term available at all for candidates run once,
and it is far steadier than a per-candidate variance from 2 or 3 seeds. With no repeated candidate
the seed term is zero and the intervals cover prompt noise only, too narrow: the method line, the
table's marked columns and a verdict note (PROMPT_NOISE_ONLY) say so.

Written here rather than with scipy.stats.bootstrap: scipy resamples each sample independently or
pairs them all, and this needs prompts paired across runs, seeds averaged per candidate and one
resample shared by every candidate, so that "tied with the best" is a paired comparison.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from autolayer.errors import AutolayerError

K = TypeVar("K", bound=Hashable)  # what identifies a candidate (racing: its layers and lr)
Z95 = 1.959964  # two-sided 95% normal quantile
RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """One candidate: mean held-out score over its seeds, C, and their intervals."""

    seeds: int
    score: float
    score_low: float
    score_high: float
    contribution: float | None  # None when C is undefined for the study's references
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Analysis(Generic[K]):
    """Every candidate's estimate, the best, and the candidates statistically tied with it."""

    estimates: dict[K, Estimate]
    best: K | None
    tied: frozenset[K]  # includes the best; empty when nothing was measured
    seed_sd: float  # pooled between-seed standard deviation of the held-out score
    seed_df: int  # its degrees of freedom (0: no candidate was repeated)
    method: str


def contribution_ratio(score: float, base_score: float, full_score: float) -> float:
    """C = (S_subset - S_base) / (S_full - S_base) (arXiv 2607.01232): the share of the
    all-layers run's gain that a subset's run reaches."""
    return (score - base_score) / (full_score - base_score)


def pooled_seed_variance(runs: Mapping[K, np.ndarray]) -> tuple[float, int]:
    """Between-seed variance of held-out scores pooled over candidates with >= 2 seeds, and its
    degrees of freedom, sum(k - 1). `runs` maps each candidate to a (seeds, prompts) array."""
    squares, df = 0.0, 0
    for outcomes in runs.values():
        if len(outcomes) >= 2:
            scores = outcomes.mean(axis=1)
            squares += float(((scores - scores.mean()) ** 2).sum())
            df += len(scores) - 1
    return (squares / df if df else 0.0), df


PROMPT_NOISE_ONLY = (
    "intervals cover prompt noise only: no candidate was run on a second training seed, so they "
    "are too narrow and the set tied with the best may be too small; racing's repeats "
    "(search.seeds 2 or more, with trials and budget left for them) add the seed term"
)


def method_line(seed_df: int, resamples: int = RESAMPLES) -> str:
    """How the intervals were made, for tables and logs."""
    prompts = (
        f"{CONFIDENCE:.0%} percentile intervals of {resamples:,} resamples of the held-out prompts"
    )
    if seed_df == 0:
        return f"{prompts}; no candidate was repeated, so training-seed noise is not included"
    return (
        f"{prompts} plus a training-seed term (pooled between-seed variance, {seed_df} df, t tails)"
    )


def format_contribution(value: float, low: float, high: float, gain: float) -> str:
    """`C [low, high]`, except that a zero-width interval is no certainty to print: every
    resample agreed because no held-out outcome changed (no change) or all moved alike."""
    if low == high:
        return "no change" if gain == 0 else f"{value:.2f} [no spread]"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def analyse(
    runs: Mapping[K, np.ndarray],
    base: np.ndarray,
    full: np.ndarray | None,
    *,
    contribution_defined: bool = True,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Analysis[K]:
    """Estimates, best and tied-best set for candidates measured on the same prompts.

    runs: candidate -> (seeds, prompts) outcomes. base: (prompts,) outcomes of the base model
    (greedy scoring of fixed weights: no seed noise). full: (seeds, prompts) of the all-layers
    reference, or None. A candidate is tied with the best when the 95% interval of their paired
    score difference includes 0.
    """
    rng = np.random.default_rng(seed)
    n = len(base)
    if any(outcomes.shape[1] != n for outcomes in runs.values()):
        raise AutolayerError("every run must be scored on the same held-out prompts")
    sigma2, df = pooled_seed_variance(runs)
    # Each row of `weights` is one resample of the prompts as multiplicities / n, so a resampled
    # mean is one matrix product (2,000 x 1,000: 16 MB), shared by every run for pairing.
    counts = [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]
    weights = np.stack(counts) / n
    base_star = weights @ base

    def variances(variance: float, dof: int) -> np.ndarray | float:
        return variance * dof / rng.chisquare(dof, resamples) if variance and dof else 0.0

    pooled = variances(sigma2, df)

    def resampled(outcomes: np.ndarray, own: np.ndarray | float | None = None) -> np.ndarray:
        variance = pooled if own is None else own
        sd = np.sqrt(np.asarray(variance) / len(outcomes))
        return weights @ outcomes.mean(axis=0) + rng.normal(0.0, 1.0, resamples) * sd

    full_star = None
    if full is not None and contribution_defined:
        own = (
            variances(float(full.mean(axis=1).var(ddof=1)), len(full) - 1)
            if len(full) >= 2
            else None
        )
        full_star = resampled(full, own)
    alpha = (1 - CONFIDENCE) / 2
    stars, estimates = {}, {}
    for key, outcomes in runs.items():
        star = stars[key] = resampled(outcomes)
        score = float(outcomes.mean())
        s_low, s_high = np.quantile(star, [alpha, 1 - alpha])
        c = low = high = None
        if full_star is not None and full is not None:
            c = contribution_ratio(score, float(base.mean()), float(full.mean()))
            denominators = np.where(
                full_star == base_star, np.finfo(float).tiny, full_star - base_star
            )
            low, high = (
                float(q) for q in np.quantile((star - base_star) / denominators, [alpha, 1 - alpha])
            )
        estimates[key] = Estimate(len(outcomes), score, float(s_low), float(s_high), c, low, high)
    best = max(estimates, key=lambda k: estimates[k].score, default=None)
    tied: set[K] = set()
    if best is not None:
        tied = {
            key
            for key in estimates
            if key == best or np.quantile(stars[best] - stars[key], alpha) <= 0
        }
    return Analysis(
        estimates, best, frozenset(tied), float(np.sqrt(sigma2)), df, method_line(df, resamples)
    )
