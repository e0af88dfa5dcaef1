"""Layer profiles of several studies on one model, and how well their rankings agree.

A study's profile is its single-layer trials' held-out scores, one per layer (the best trial when
a layer was tried at several lrs). Within a study C = (S - S_base) / (S_full - S_base) is an
increasing function of S whenever the all-layers run gained, so ranks of S are ranks of C; scores
are correlated because they stay defined when a study's C is not. Rank agreement is Spearman's
rho and Kendall's tau with exact permutation p-values, and percentile intervals from a bootstrap
that resamples each study's held-out prompts (every layer of a study on the same resample), so a
profile's own noise widens the interval. A profile whose two independent resamples rank the
layers alike less than NOISY_BELOW (median Spearman) is reported as too noisy to correlate.
The cross-task comparison follows arXiv 2607.01232 (Spearman 0.76 math vs math, 0.59 math vs code).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

from autolayer.errors import AutolayerError
from autolayer.study import StudyRecord, records

MIN_LAYERS = 3  # fewer shared layers give no usable rank correlation
NOISY_BELOW = 0.5  # median Spearman between two resamples of one profile
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


def _resampled_scores(p: Profile, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, layers): scores on n bootstrap resamples of the profile's prompts."""
    prompts = p.outcomes.shape[1]
    idx = rng.integers(0, prompts, size=(n, prompts))
    return np.asarray(p.outcomes[:, idx].mean(axis=2).T)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; 0 for a constant resample, which ranks nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr(x, y).statistic
    return 0.0 if np.isnan(rho) else float(rho)


EXACT_UP_TO = 8  # 8! = 40,320 orderings: enumerate them; beyond, sample 20,000


def spearman_p(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho: the share of orderings of y whose rho
    is at least as extreme; exact (every ordering) up to EXACT_UP_TO layers."""
    rx = stats.rankdata(x) - (len(x) + 1) / 2
    ry = stats.rankdata(y) - (len(y) + 1) / 2
    scale = np.sqrt((rx**2).sum() * (ry**2).sum())
    if scale == 0:
        return 1.0  # a constant profile has no ranking
    if len(y) <= EXACT_UP_TO:
        orders = np.array(list(itertools.permutations(ry)))
    else:
        rng = np.random.default_rng(seed)
        orders = np.array([rng.permutation(ry) for _ in range(20_000)])
    rhos = orders @ rx / scale
    observed = abs(float(rx @ ry / scale))
    return float(np.mean(np.abs(rhos) >= observed - 1e-12))


def noisiness(p: Profile, seed: int = 0, n: int = 200) -> float:
    """Median Spearman between two independent resamples of the same profile (1: stable)."""
    rng = np.random.default_rng(seed)
    a, b = _resampled_scores(p, rng, n), _resampled_scores(p, rng, n)
    return float(np.median([_spearman(x, y) for x, y in zip(a, b, strict=True)]))


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
    """Rank agreement of two profiles over their shared layers, with exact p and bootstrap CIs."""
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
    tau = stats.kendalltau(x, y)  # scipy: exact p for small untied samples
    rng = np.random.default_rng(seed)
    ra, rb = _resampled_scores(a, rng, n)[:, ia], _resampled_scores(b, rng, n)[:, ib]
    rhos = [_spearman(u, v) for u, v in zip(ra, rb, strict=True)]
    taus = [
        float(np.nan_to_num(stats.kendalltau(u, v).statistic)) for u, v in zip(ra, rb, strict=True)
    ]
    noisy = [p.study for p in (a, b) if noisiness(p, seed) < NOISY_BELOW]
    return Agreement(
        a.study,
        b.study,
        len(shared),
        _spearman(x, y),
        spearman_p(x, y),
        (float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))),
        float(np.nan_to_num(tau.statistic)),
        float(tau.pvalue),
        (float(np.percentile(taus, 2.5)), float(np.percentile(taus, 97.5))),
        f"too noisy to correlate: {', '.join(noisy)}" if noisy else "",
    )


def agreements(profiles: list[Profile], seed: int = 0) -> list[Agreement]:
    return [agreement(a, b, seed) for a, b in itertools.combinations(profiles, 2)]
