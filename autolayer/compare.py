"""Layer profiles of several studies on one model, and how well their rankings agree.

A study's profile is its single-layer trials' held-out scores, one per layer (the best trial when
a layer was tried at several lrs). Within a study C = (S - S_base) / (S_full - S_base) is an
increasing function of S whenever the all-layers run gained, so ranks of S are ranks of C; scores
are correlated because they stay defined when a study's C is not. Rank agreement is Spearman's
rho and Kendall's tau-b with permutation p-values that keep ties as they are (exact up to
EXACT_UP_TO layers), and percentile intervals from a bootstrap that resamples each study's
held-out prompts (every layer of a study on the same resample), so a profile's own noise widens
the interval. A profile's stability is the median Spearman between two independent resamples of
it; pure noise gives about 0.5, not 0, so the bar comes from a permutation null: a profile is
too noisy to correlate unless its stability beats that of profiles whose prompts' outcomes are
shuffled across layers at level NOISE_ALPHA (pure noise then escapes the flag at most 5% of the
time). The cross-task comparison follows arXiv 2607.01232 (Spearman 0.76 math vs math, 0.59 math
vs code).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

from autolayer.errors import AutolayerError
from autolayer.study import StudyRecord, records

MIN_LAYERS = 3  # fewer shared layers give no usable rank correlation
NOISE_ALPHA = 0.05  # a profile of pure noise passes as rankable at most this often
NULL_PROFILES = 200  # shuffled profiles behind the noise test: p-values in steps of 1/201
RESAMPLES = 1000


@dataclass(frozen=True)
class Profile:
    study: str
    model: str
    layers: tuple[int, ...]
    outcomes: np.ndarray  # (layers, prompts): each layer's per-prompt held-out outcome

    @property
    def scores(self) -> np.ndarray:
        return np.asarray(self.outcomes.mean(axis=1))


def profile(study: optuna.Study) -> Profile:
    """The study's single-layer profile; fewer than MIN_LAYERS layers is one sentence."""
    best: dict[int, tuple[float, list[float]]] = {}
    for record in records(study, states=(TrialState.COMPLETE,)):
        layers, outcomes = record.layers, record.outcomes
        if len(layers) != 1 or not outcomes or record.infeasible:
            continue
        score = float(np.mean(outcomes))
        if layers[0] not in best or score > best[layers[0]][0]:
            best[layers[0]] = (score, list(outcomes))
    if len(best) < MIN_LAYERS:
        raise AutolayerError(
            f"study '{study.study_name}' has {len(best)} completed single-layer trials; a "
            f"profile needs at least {MIN_LAYERS}"
        )
    layers = tuple(sorted(best))
    return Profile(
        study.study_name,
        StudyRecord.of(study).model or "",
        layers,
        np.array([best[layer][1] for layer in layers], dtype=float),
    )


def _resampled_scores(outcomes: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, layers): a profile's scores on n bootstrap resamples of its prompts."""
    prompts = outcomes.shape[1]
    idx = rng.integers(0, prompts, size=(n, prompts))
    return np.asarray(outcomes[:, idx].mean(axis=2).T)


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of `a` with the same row of `b`; 0 for a constant row, which
    ranks nothing."""
    ra = stats.rankdata(a, axis=1)
    rb = stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    scale = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    products = (ra * rb).sum(axis=1)
    return np.divide(products, scale, out=np.zeros_like(products), where=scale > 0)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(_row_spearman(x[None], y[None])[0])


EXACT_UP_TO = 8  # 8! = 40,320 orderings: enumerate them; beyond, sample SAMPLED_ORDERINGS
SAMPLED_ORDERINGS = 20_000
CHUNK = 2_000  # orderings per block of Kendall's pair signs (layers^2 / 2 values each)


def _orderings(values: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """Blocks of orderings of `values`: every one up to EXACT_UP_TO values, the observed order
    plus SAMPLED_ORDERINGS - 1 random ones beyond (so a sampled p-value is never 0)."""
    if len(values) <= EXACT_UP_TO:
        yield np.array(list(itertools.permutations(values)))
        return
    rng = np.random.default_rng(seed)
    yield values[None]
    for start in range(1, SAMPLED_ORDERINGS, CHUNK):
        count = min(CHUNK, SAMPLED_ORDERINGS - start)
        yield rng.permuted(np.tile(values, (count, 1)), axis=1)


def _permutation_p(
    y: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], seed: int
) -> float:
    """Two-sided permutation p-value: the share of orderings of y (one per row) whose statistic
    is at least as extreme as the observed order's. Ties stay as they are: orderings permute the
    values, so tied values stay tied and the null is the one the tied data have."""
    observed = abs(float(statistic(y[None])[0]))
    hits = total = 0
    for block in _orderings(y, seed):
        hits += int(np.sum(np.abs(statistic(block)) >= observed - 1e-12))
        total += len(block)
    return hits / total


def spearman_p(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho, exact up to EXACT_UP_TO layers."""
    rx = stats.rankdata(x) - (len(x) + 1) / 2
    ry = stats.rankdata(y) - (len(y) + 1) / 2
    if not rx.any() or not ry.any():
        return 1.0  # a constant profile has no ranking
    return _permutation_p(ry, lambda orders: orders @ rx, seed)  # rho's scale is fixed


def kendall_p(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Two-sided permutation p-value of Kendall's tau-b, exact up to EXACT_UP_TO layers.

    scipy's `kendalltau` is exact only without ties and asymptotic with them, which gives about
    half the p-value ties deserve on a few layers. Permuting y keeps tau-b's denominator, so the
    numerator, concordant minus discordant pairs, ranks the orderings as tau-b does."""
    i, j = np.triu_indices(len(x), k=1)
    sx = np.sign(x[i] - x[j])
    if not sx.any() or not np.sign(y[i] - y[j]).any():
        return 1.0  # a constant profile has no ranking
    return _permutation_p(y, lambda orders: np.sign(orders[:, i] - orders[:, j]) @ sx, seed)


def _stability(outcomes: np.ndarray, rng: np.random.Generator, n: int) -> float:
    a = _resampled_scores(outcomes, rng, n)
    b = _resampled_scores(outcomes, rng, n)
    return float(np.median(_row_spearman(a, b)))


def noisiness(p: Profile, seed: int = 0, n: int = 200) -> float:
    """Median Spearman between two independent resamples of the same profile (1: stable; pure
    noise gives about 0.5, since both resamples share the observed noise)."""
    return _stability(p.outcomes, np.random.default_rng(seed), n)


def noise_p(p: Profile, seed: int = 0, draws: int = NULL_PROFILES, n: int = 200) -> float:
    """Permutation p-value of the profile's stability against pure noise: the share of profiles,
    the observed one included, at least as stable, among it and `draws` with each prompt's
    outcomes shuffled across layers (no layer effect; the same prompts and outcomes)."""
    observed = noisiness(p, seed, n)
    rng = np.random.default_rng([seed, 1])  # a stream apart from the observed resamples'
    null = [_stability(rng.permuted(p.outcomes, axis=0), rng, n) for _ in range(draws)]
    return (1 + sum(s >= observed for s in null)) / (1 + draws)


def too_noisy(p: Profile, seed: int = 0) -> bool:
    """Whether the profile's layers rank no more stably than shuffled ones at NOISE_ALPHA."""
    return noise_p(p, seed) > NOISE_ALPHA


@dataclass(frozen=True)
class Agreement:
    first: str
    second: str
    layers: int
    spearman: float
    spearman_p: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_p: float
    kendall_ci: tuple[float, float]
    note: str = ""


def agreement(a: Profile, b: Profile, seed: int = 0, n: int = RESAMPLES) -> Agreement:
    """Rank agreement of two profiles over their shared layers, with permutation p-values (exact
    up to EXACT_UP_TO layers) and bootstrap CIs."""
    if a.model != b.model:
        raise AutolayerError(
            f"studies '{a.study}' ({a.model}) and '{b.study}' ({b.model}) are on different "
            "models; layer profiles only compare on one model"
        )
    shared = sorted(set(a.layers) & set(b.layers))
    if len(shared) < MIN_LAYERS:
        raise AutolayerError(
            f"studies '{a.study}' and '{b.study}' share {len(shared)} layers; at least "
            f"{MIN_LAYERS} are needed"
        )
    ia, ib = [a.layers.index(x) for x in shared], [b.layers.index(x) for x in shared]
    x, y = a.scores[ia], b.scores[ib]
    tau = stats.kendalltau(x, y).statistic
    rng = np.random.default_rng(seed)
    ra = _resampled_scores(a.outcomes, rng, n)[:, ia]
    rb = _resampled_scores(b.outcomes, rng, n)[:, ib]
    rhos = _row_spearman(ra, rb)
    taus = [
        float(np.nan_to_num(stats.kendalltau(u, v).statistic)) for u, v in zip(ra, rb, strict=True)
    ]
    noisy = [p.study for p in (a, b) if too_noisy(p, seed)]
    return Agreement(
        a.study,
        b.study,
        len(shared),
        _spearman(x, y),
        spearman_p(x, y),
        (float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))),
        float(np.nan_to_num(tau)),
        kendall_p(x, y, seed),
        (float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))),
        f"too noisy to correlate: {', '.join(noisy)}" if noisy else "",
    )


def agreements(profiles: list[Profile], seed: int = 0) -> list[Agreement]:
    return [agreement(a, b, seed) for a, b in itertools.combinations(profiles, 2)]
