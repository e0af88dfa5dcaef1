"""Samplers and pruners for a layer search, chosen by name (`search.sampler`, `search.pruner`)."""

from __future__ import annotations

import warnings

import optuna

from autolayer.config import PrunerName, SamplerName
from autolayer.errors import AutolayerError
from autolayer.estimate import Z95
from autolayer.spaces import Space, grid_size
from autolayer.study import StudyRecord, TrialRecord

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


class IntervalPruner(optuna.pruners.BasePruner):
    """Prune only a trial that cannot catch up, even on an optimistic reading of its curve.

    At step t with value v, the trial's learning curve is extrapolated to the last step at the
    steeper of its slope since step 0 (the untrained model's objective, study attr
    `objective_origin`) and its slope since its previous report; the projection plus Z95 (1.96)
    standard errors of v (trial attr `objective_se`) is its optimistic final value. The trial is
    pruned when that is below the best completed trial's final value minus Z95 of its standard
    errors. A median pruner compares one early point with other trials' early points, and so
    stops slow starters that would have finished near the top; this one stops only what is behind
    by more than noise and has no slope to close the gap.
    """

    def __init__(self, final_step: int, n_warmup_steps: int = 0) -> None:
        self.final_step = final_step
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps or step >= self.final_step:
            return False
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None
        ]
        if not complete:
            return False
        best = max(complete, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
        bar = float(best.value) - Z95 * TrialRecord.of(best).objective_se  # type: ignore[arg-type]
        origin = StudyRecord.of(study).objective_origin
        return optimistic_final(trial, self.final_step, origin) < bar


def optimistic_final(
    trial: optuna.trial.FrozenTrial, final_step: int, origin: float | None
) -> float:
    """The trial's last value extrapolated to `final_step` at its steepest recent slope, plus
    Z95 (1.96) standard errors."""
    values = trial.intermediate_values
    steps = sorted(values)
    step, value = steps[-1], values[steps[-1]]
    slopes = [0.0]
    if origin is not None:
        slopes.append((value - origin) / step)
    if len(steps) >= 2:
        slopes.append((value - values[steps[-2]]) / (step - steps[-2]))
    projected = value + max(slopes) * (final_step - step)
    return projected + Z95 * TrialRecord.of(trial).objective_se


def make_pruner(
    name: PrunerName, n_warmup_steps: int = 0, final_step: int | None = None
) -> optuna.pruners.BasePruner:
    """A pruner; each expects the trial to report in its own way.

    - none: never prunes.
    - interval: `IntervalPruner`, same reports as median plus each report's standard error; needs
      `final_step`, the step the trial ends at.
    - median: prunes a trial whose held-out score at a step is below the median of earlier
      trials at that step. Report the held-out score with `step` = the proxy step (sampled batch).
      Starts after 2 finished trials and `n_warmup_steps` steps.
    - hyperband: successive halving over brackets; same reports as median, with `n_warmup_steps`
      as the smallest budget a trial gets (`min_resource`); `max_resource` is learned from the
      first finished trial.
    - wilcoxon: a paired signed-rank test against the best trial. Report the objective of
      consecutive blocks of the fixed held-out prompts with `step` = the block's index, the same
      blocks for every trial, so values pair across trials; the search reports blocks of 50 after
      a trial's run and raises TrialPruned when it says prune (the trial keeps its score).
    """
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "interval":
        if final_step is None:
            raise ValueError("the interval pruner needs the final step")
        return IntervalPruner(final_step, n_warmup_steps)
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
    raise AutolayerError(
        f"unknown pruner {name!r}; use none, interval, median, hyperband or wilcoxon"
    )
