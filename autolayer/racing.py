"""After the search: measure the free heuristics' picks, then race the contenders over seeds.

A search runs every candidate once, on seed `proxy.seed`. One seed says nothing about training
noise, which on small RL runs is often larger than the held-out prompts' noise. Racing spends
repeats only where they decide something: the best candidate and those statistically tied with it
(`autolayer.estimate`) get one more seed per round, until the best separates from the rest or
every contender has `search.seeds` runs. The first round always repeats the best two, so the
pooled seed variance exists before any tie is decided.

Repeats and baselines are ordinary trials of the same study (user attrs `seed`, `role`), queued
with their params, so a killed search resumes them like any other trial and never reruns one that
finished. They are never pruned: a contender's repeat and a baseline are measured to the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autolayer import baselines
from autolayer.estimate import Analysis, analyse
from autolayer.search import (
    ATTR_BASE,
    ATTR_FULL,
    SearchContext,
    TrialFailed,
    can_start_trial,
    run_trial,
)
from autolayer.spaces import Space, baseline_params

Key = tuple[tuple[int, ...], float]  # a measured candidate: its layers and lr
ATTR_BASELINES = "baselines"  # study attr: heuristic name -> layers of its pick
ATTR_SNR = "spectrum_snr"  # study attr: Spectrum's score per layer


@dataclass(frozen=True)
class Run:
    """One queued trial: a candidate's params, the seed to train it on, and why it runs."""

    params: dict[str, Any]
    seed: int
    role: str  # "repeat" or "baseline:<name>"

    @property
    def attrs(self) -> dict[str, Any]:
        return {"seed": self.seed, "role": self.role}


def trial_seed(trial: FrozenTrial, default: int = 0) -> int:
    return int(trial.user_attrs.get("seed", default))


def measured(study: optuna.Study) -> dict[Key, dict[int, FrozenTrial]]:
    """Every completed candidate's trials by seed (the first trial of a seed, if TPE repeats)."""
    runs: dict[Key, dict[int, FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "outcomes" not in attrs:
            continue  # infeasible subsets are complete without a run
        key = (tuple(attrs["layers"]), float(attrs["lr"]))
        runs.setdefault(key, {}).setdefault(trial_seed(trial), trial)
    return runs


def study_analysis(study: optuna.Study, seed: int = 0) -> Analysis[Key] | None:
    """Estimates, best and tied set of a study's completed candidates, from storage alone."""
    runs = measured(study)
    base = study.user_attrs.get(ATTR_BASE)
    if not runs or base is None:
        return None
    full = study.user_attrs.get(ATTR_FULL)
    outcomes = {
        key: np.array([by_seed[s].user_attrs["outcomes"] for s in sorted(by_seed)], dtype=float)
        for key, by_seed in runs.items()
    }
    return analyse(
        outcomes,
        np.asarray(base, dtype=float),
        None if full is None else np.asarray([full], dtype=float),
        contribution_defined=study.user_attrs.get("objective") == "contribution C",
        seed=seed,
    )


def _params_of(study: optuna.Study, key: Key) -> dict[str, Any]:
    trial = next(iter(measured(study)[key].values()))
    return dict(trial.params)


def next_repeats(ctx: SearchContext, analysis: Analysis[Key], first_round: bool) -> list[Run]:
    """One more seed for every contender that has fewer than `search.seeds` (empty: done)."""
    target = ctx.config.search.seeds
    ranked = sorted(analysis.estimates, key=lambda k: -analysis.estimates[k].score)
    contenders = set(analysis.tied)
    if first_round:
        contenders |= set(ranked[:2])  # a seed variance to judge ties by
    elif analysis.tied == {analysis.best}:
        return []  # the best is separated from every other candidate
    runs = measured(ctx.study)
    repeats = []
    for key in ranked:
        if key not in contenders or len(runs[key]) >= target:
            continue
        params = _params_of(ctx.study, key)
        tried = _tried_seeds(ctx.study, params)  # a seed whose run failed is not tried again here
        first = ctx.config.proxy.seed
        seed = next((s for s in range(first, first + target) if s not in tried), None)
        if seed is not None:
            repeats.append(Run(params, seed, "repeat"))
    return repeats


def _tried_seeds(study: optuna.Study, params: dict[str, Any]) -> set[int]:
    return {
        trial_seed(t, -1)
        for t in study.get_trials(deepcopy=False)
        if (t.params or t.system_attrs.get("fixed_params", {})) == params
    }


def race(ctx: SearchContext) -> None:
    """Repeat contenders over seeds until the best separates or each has `search.seeds` runs."""
    if ctx.config.search.seeds <= 1:
        return
    if not drain(ctx):  # a killed race's queued repeats first
        return
    first = True
    while True:
        analysis = study_analysis(ctx.study, ctx.config.search.seed)
        if analysis is None:
            return
        repeats = next_repeats(ctx, analysis, first)
        if not repeats:
            return
        ctx.hooks.on_message(
            f"racing: {len(repeats)} contender(s) on one more training seed "
            f"({', '.join(_label(r.params, ctx.study) for r in repeats)})"
        )
        if not run_queued(ctx, repeats):
            return  # the budget or the timeout ended the race
        first = False


def _label(params: dict[str, Any], study: optuna.Study) -> str:
    for key, by_seed in measured(study).items():
        if dict(next(iter(by_seed.values())).params) == params:
            return ",".join(map(str, key[0]))
    return str(params)


def pick_baselines(ctx: SearchContext, analysis: Analysis[Key]) -> dict[str, tuple[int, ...]]:
    """The heuristics' candidates of the pick's size, recorded in the study."""
    assert analysis.best is not None
    layers, _ = analysis.best
    snr = ctx.study.user_attrs.get(ATTR_SNR)
    if snr is None:
        from autolayer.models import find_layer_stack

        snr = baselines.layer_snr(list(find_layer_stack(ctx.model).layers))
        ctx.study.set_user_attr(ATTR_SNR, snr)
    chosen = baselines.picks(
        ctx.space.kind, ctx.space.bounds, len(layers), snr, ctx.config.search.seed
    )
    ctx.study.set_user_attr(ATTR_BASELINES, {name: list(ls) for name, ls in chosen.items()})
    return chosen


def measure_baselines(ctx: SearchContext) -> None:
    """Run, unpruned, each heuristic's pick that has no completed run yet."""
    if not ctx.config.search.baselines:
        return
    analysis = study_analysis(ctx.study, ctx.config.search.seed)
    if analysis is None or analysis.best is None:
        return
    _, lr = analysis.best
    done = {key[0] for key in measured(ctx.study)}
    todo = []
    for name, layers in pick_baselines(ctx, analysis).items():
        params = baseline_params(ctx.space, layers, lr)
        if layers not in done and params is not None:
            todo.append(Run(params, ctx.config.proxy.seed, f"baseline:{name}"))
            done.add(layers)
    if todo:
        ctx.hooks.on_message(
            "baselines: measuring "
            + ", ".join(f"{r.role.split(':')[1]} ({_layers(r, ctx.space)})" for r in todo)
        )
        run_queued(ctx, todo)


def _layers(run: Run, space: Space) -> str:
    from autolayer.spaces import candidate_from_params

    return ",".join(map(str, candidate_from_params(run.params, space).layers))


def _queued_or_done(study: optuna.Study, run: Run) -> bool:
    """Whether a run of these params and seed is waiting, running or complete. A pruned search
    trial does not count (a baseline measures its candidate to the end); a pruned queued run
    (a worker's duplicate) does."""
    for trial in study.get_trials(deepcopy=False):
        params = trial.params or trial.system_attrs.get("fixed_params", {})
        if params != run.params or trial_seed(trial, -1) != run.seed:
            continue
        pruned_queued = trial.state == TrialState.PRUNED and "role" in trial.user_attrs
        if trial.state in _LIVE or pruned_queued:
            return True
    return False


_LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def run_queued(ctx: SearchContext, runs: Iterable[Run]) -> bool:
    """Queue `runs` (skipping any another worker queued or ran) and run every queued trial.

    Returns False when the step budget or the timeout stopped it; what is left stays queued and
    a rerun of the search runs it.
    """
    for run in runs:
        if not _queued_or_done(ctx.study, run):
            ctx.study.enqueue_trial(run.params, user_attrs=run.attrs)
    return drain(ctx)


def _waiting(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}


def drain(ctx: SearchContext) -> bool:
    """Run the study's queued trials in this process (a killed race's leftovers included).

    Ask/tell rather than `study.optimize`: the exhaustive sampler stops a study once its grid is
    walked, and a repeat walks no new point. Queued params are fixed, so the random sampler swapped
    in for these trials never samples anything.
    """
    sampler = ctx.study.sampler
    ctx.study.sampler = optuna.samplers.RandomSampler(seed=ctx.config.search.seed)
    try:
        while waiting := _waiting(ctx.study):
            if not can_start_trial(ctx):
                return False
            _run_one(ctx, waiting)
    finally:
        ctx.study.sampler = sampler
    return True


def _run_one(ctx: SearchContext, waiting: set[int]) -> None:
    trial = ctx.study.ask()
    if trial.number not in waiting:  # another worker took the last queued trial first
        trial.set_user_attr("prune_reason", "nothing to run: another worker took the queued run")
        ctx.study.tell(trial, state=TrialState.PRUNED)
        return
    try:
        value = run_trial(ctx, trial)
    except optuna.TrialPruned:
        ctx.study.tell(trial, state=TrialState.PRUNED)
    except TrialFailed:
        ctx.study.tell(trial, state=TrialState.FAIL)
    except BaseException:
        ctx.study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        ctx.study.tell(trial, value)
    ctx.hooks.on_trial_end(ctx.study.get_trials(deepcopy=False)[trial.number])
