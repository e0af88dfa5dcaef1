"""After the search: measure the free heuristics' picks, then race the contenders over seeds.

A search runs every candidate once, on seed `proxy.seed`. One seed says nothing about training
noise, which on small RL runs is often larger than the held-out prompts' noise. Racing spends
repeats only where they decide something: the best candidate and those statistically tied with it
(`autolayer.estimate`), among the top `search.contenders`, get one more seed per round, until the
best separates from the rest or every contender has `search.seeds` runs. While no
candidate has been repeated there is no seed variance to judge ties by, so that round always
repeats the best two.

Repeats and baselines are ordinary trials of the same study (user attrs `seed`, `role`), queued
with their params, so a killed search resumes them like any other trial and never reruns one that
finished. They are never pruned: a contender's repeat and a baseline are measured to the end.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from autolayer import baselines
from autolayer.estimate import Analysis
from autolayer.search import (
    SearchContext,
    TrialFailed,
    can_start_trial,
    run_trial,
)
from autolayer.spaces import Space, baseline_params, candidate_from_params
from autolayer.storage import MAX_ATTEMPTS, params_key
from autolayer.study import (
    CandidateKey,
    StudyRecord,
    TrialRecord,
    measured,
    study_analysis,
    trial_fields,
    trial_seed,
    write_study,
)


@dataclass(frozen=True)
class Run:
    """One queued trial: a candidate's params, the seed to train it on, and why it runs."""

    params: dict[str, Any]
    seed: int
    role: str  # "repeat" or "baseline:<name>"

    @property
    def attrs(self) -> dict[str, Any]:
        return trial_fields(seed=self.seed, role=self.role)


def _params(trial: FrozenTrial) -> dict[str, Any]:
    return dict(params_key(trial))


def next_repeats(ctx: SearchContext, analysis: Analysis[CandidateKey]) -> list[Run]:
    """One more seed for each contender with fewer than `search.seeds` runs (empty: done).

    Contenders are the candidates tied with the best, among the race's pool: the top
    `search.contenders` by their first run's score, a ranking later seeds cannot reshuffle, so a
    race costs at most contenders x (seeds - 1) runs however flat the landscape is.
    """
    target = ctx.config.search.seeds
    runs = measured(ctx.study)

    def first_score(key: CandidateKey) -> float:
        return float(np.mean(TrialRecord.of(runs[key][min(runs[key])]).outcomes or ()))

    pool = sorted(runs, key=lambda k: -first_score(k))[: ctx.config.search.contenders]
    ranked = sorted(pool, key=lambda k: -analysis.estimates[k].score)
    if analysis.seed_df == 0:
        contenders = set(ranked[:2]) | set(analysis.tied)  # a seed variance to judge ties by
    elif analysis.tied == {analysis.best}:
        return []  # the best is separated from every other candidate
    else:
        contenders = set(analysis.tied)
    repeats: list[Run] = []
    for key in ranked:
        if key not in contenders or len(runs[key]) >= target:
            continue
        params = _params(next(iter(runs[key].values())))
        tried = _tried_seeds(ctx.study, params)  # a seed whose run failed is not tried again here
        first = ctx.config.proxy.seed
        seed = next((s for s in range(first, first + target) if s not in tried), None)
        if seed is not None:
            repeats.append(Run(params, seed, "repeat"))
    return repeats


def _tried_seeds(study: optuna.Study, params: dict[str, Any]) -> set[int]:
    return {trial_seed(study, t) for t in study.get_trials(deepcopy=False) if _params(t) == params}


def race(ctx: SearchContext) -> None:
    """Repeat contenders over seeds until the best separates or each has `search.seeds` runs."""
    if ctx.config.search.seeds <= 1:
        return
    if not drain(ctx):  # a killed race's queued repeats first
        return
    while True:
        analysis = study_analysis(ctx.study)
        if analysis is None:
            return
        repeats = next_repeats(ctx, analysis)
        if not repeats:
            return
        labels = ", ".join(_label(r.params, ctx.space) for r in repeats)
        ctx.hooks.on_message(f"racing: {len(repeats)} contender(s) on another seed ({labels})")
        if not run_queued(ctx, repeats):
            return  # n_trials, the budget or the timeout ended the race


def _label(params: dict[str, Any], space: Space) -> str:
    return ",".join(map(str, candidate_from_params(params, space).layers))


def pick_baselines(
    ctx: SearchContext, analysis: Analysis[CandidateKey]
) -> dict[str, tuple[int, ...]]:
    """The heuristics' candidates of the pick's size, recorded in the study with the pick's lr."""
    assert analysis.best is not None
    layers, lr = analysis.best
    recorded = StudyRecord.of(ctx.study).spectrum_snr
    if recorded is None:
        from autolayer.models import find_layer_stack

        snr = baselines.layer_snr(list(find_layer_stack(ctx.work.model).layers))
        write_study(ctx.study, spectrum_snr=snr)
    else:
        snr = list(recorded)
    seed = ctx.config.proxy.seed  # the study's: every worker draws the same random layers
    space = ctx.space
    chosen = baselines.picks(space.kind, space.bounds, len(layers), snr, seed, space.stride)
    write_study(
        ctx.study, baselines={name: list(ls) for name, ls in chosen.items()}, baselines_lr=lr
    )
    return chosen


def measure_baselines(ctx: SearchContext) -> None:
    """Run, unpruned, each heuristic's pick that has no completed run at the pick's lr yet."""
    if not ctx.config.search.baselines:
        return
    analysis = study_analysis(ctx.study)
    if analysis is None or analysis.best is None:
        return
    _, lr = analysis.best
    done = set(measured(ctx.study))
    todo = []
    for name, layers in pick_baselines(ctx, analysis).items():
        params = baseline_params(ctx.space, layers, lr)
        if (layers, lr) in done or params is None:
            continue
        run = Run(params, ctx.config.proxy.seed, f"baseline:{name}")
        if _failures(ctx.study, run) < MAX_ATTEMPTS:  # one that keeps failing is given up
            todo.append(run)
            done.add((layers, lr))
    if todo:
        names = [f"{r.role.split(':')[1]} ({_label(r.params, ctx.space)})" for r in todo]
        ctx.hooks.on_message("baselines: measuring " + ", ".join(names))
        run_queued(ctx, todo)


def _same_run(study: optuna.Study, trial: FrozenTrial, run: Run) -> bool:
    return _params(trial) == run.params and trial_seed(study, trial) == run.seed


def _failures(study: optuna.Study, run: Run) -> int:
    states = (TrialState.FAIL,)
    return sum(_same_run(study, t, run) for t in study.get_trials(deepcopy=False, states=states))


_LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def _queued_or_done(study: optuna.Study, run: Run) -> bool:
    """Whether a run of these params and seed is waiting, running or complete. A pruned search
    trial does not count (a baseline measures its candidate to the end), nor does a queued run
    that the budget stopped; a worker's pruned duplicate does."""
    for trial in study.get_trials(deepcopy=False):
        if not _same_run(study, trial, run):
            continue
        duplicate = (
            trial.state == TrialState.PRUNED and TrialRecord.of(trial).duplicate_of is not None
        )
        if trial.state in _LIVE or duplicate:
            return True
    return False


def run_queued(ctx: SearchContext, runs: Iterable[Run]) -> bool:
    """Queue `runs` (skipping any another worker queued or ran) and run every queued trial.

    Returns False when n_trials, the step budget or the timeout stopped it; what is left stays
    queued and a rerun of the search runs it.
    """
    for run in runs:
        if not _queued_or_done(ctx.study, run):
            ctx.study.enqueue_trial(run.params, user_attrs=run.attrs)
    return drain(ctx)


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def drain(ctx: SearchContext) -> bool:
    """Run the study's queued trials in this process (a killed race's leftovers included).

    The exhaustive sampler's `after_trial` stops a study whose grid is walked, which raises
    outside `study.optimize`, and a repeat walks no new point; queued params are fixed, so the
    random sampler swapped in meanwhile samples nothing.
    """
    ctx.hooks.on_more(_waiting(ctx.study))
    sampler = ctx.study.sampler
    ctx.study.sampler = optuna.samplers.RandomSampler(seed=ctx.config.search.seed)
    try:
        while _waiting(ctx.study):
            if not can_start_trial(ctx):
                return False
            trial = _pop(ctx.study)
            if trial is None:
                break  # another worker took the last one
            _run_one(ctx, trial)
    finally:
        ctx.study.sampler = sampler
    return True


def _pop(study: optuna.Study) -> optuna.Trial | None:
    """The oldest queued trial, now RUNNING, or None when the queue is empty.

    Not `study.ask()`: on an empty queue (another worker took the last trial) it creates a new
    trial without params, which the exhaustive sampler then fails on for good. Optuna has no
    public "pop or nothing", so this calls the private method `ask()` itself uses.
    """
    study._thread_local.cached_all_trials = None  # as ask() does: see other workers' writes
    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


def _run_one(ctx: SearchContext, trial: optuna.Trial) -> None:
    """Run a popped trial as `study.optimize` would: with a heartbeat (PostgreSQL and MySQL fail
    a trial whose worker stops beating), told its outcome, memory collected after."""
    # The heartbeat thread is what `study.optimize` runs around each trial (private in Optuna).
    state, value = TrialState.FAIL, None
    try:
        with get_heartbeat_thread(trial._trial_id, ctx.study._storage):
            value = run_trial(ctx, trial)
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except TrialFailed:
        pass
    finally:
        ctx.study.tell(trial, value, state=state)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ctx.hooks.on_trial_end(ctx.study.get_trials(deepcopy=False)[trial.number])
