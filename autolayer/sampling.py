"""Samplers and pruners for a layer search, chosen by name (`search.sampler`, `search.pruner`)."""

from __future__ import annotations

import warnings

import optuna

from autolayer.config import PrunerName, SamplerName
from autolayer.errors import AutolayerError
from autolayer.spaces import Space, grid_size

AUTO_GRID_LIMIT = 64  # `auto` walks a space exhaustively up to this many points, else uses TPE


def make_sampler(name: SamplerName, space: Space, seed: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler for a bound space.

    auto: BruteForceSampler when the grid has at most 64 points (`grid_size`: for subset every
    yes/no vector), else TPE. grid: BruteForceSampler, which handles the window's `start` range
    that depends on `width` and stops the study once every point has been tried; a continuous lr
    range is an error. tpe, gp, random: Optuna's, with 5.0 defaults (TPE multivariate with
    constant liar). TPE models the window's `start` on its own; GP samples it at random (and logs
    so), so prefer tpe for window spaces.

    Workers sharing one study should pass different seeds (e.g. seed + worker rank): with equal
    seeds their random start-up trials (and the grid's visiting order) coincide.
    """
    if name == "auto":
        points = grid_size(space)
        name = "grid" if points is not None and points <= AUTO_GRID_LIMIT else "tpe"
    if name == "grid":
        if grid_size(space) is None:
            raise AutolayerError(
                "the grid sampler cannot enumerate a continuous lr range; list lr choices in the "
                "search space instead, e.g. lr: [1.0e-3, 3.0e-3, 1.0e-2]"
            )
        with warnings.catch_warnings():  # "experimental" since Optuna 3.1, stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutolayerError(f"unknown sampler {name!r}; use auto, grid, tpe, gp or random")


def make_pruner(name: PrunerName, n_warmup_steps: int = 0) -> optuna.pruners.BasePruner:
    """A pruner; each expects the trial to report in its own way.

    - none: never prunes.
    - median: prunes a trial whose held-out score at a step is below the median of earlier
      trials at that step. Report the held-out score with `step` = the global optimizer step.
      Starts after 2 finished trials and `n_warmup_steps` steps.
    - hyperband: successive halving over brackets; same reports as median, with `n_warmup_steps`
      as the smallest budget a trial gets (`min_resource`); `max_resource` is learned from the
      first finished trial.
    - wilcoxon: a paired signed-rank test against the best trial. Report one outcome per held-out
      prompt with `step` = that prompt's index in the fixed eval set, so values pair across
      trials on the same prompts. When it says prune, return the objective estimated from the
      outcomes so far instead of raising TrialPruned (Optuna's advice), so the trial keeps a value.
    """
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=n_warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, n_warmup_steps), max_resource="auto"
        )
    if name == "wilcoxon":
        with warnings.catch_warnings():  # "experimental" since Optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    raise AutolayerError(f"unknown pruner {name!r}; use none, median, hyperband or wilcoxon")
