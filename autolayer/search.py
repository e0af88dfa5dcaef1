"""The layer search: an Optuna study whose trials are proxy RL runs over layer subsets.

One process loads the model once; every trial trains its layers in place and the search puts the
original values back afterwards (only the trained layers' values are kept aside, so the memory
cost is one copy of those layers). The base model and the all-layers run are the references for
`C`: the base score is cached on disk per (model, task, eval set), the full run once per study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autolayer.config import Config, require_one_device
from autolayer.errors import AutolayerError, Interrupted, TrialInterrupted
from autolayer.frozen import FrozenStates
from autolayer.loading import Workload, base_reference, load_for, prepare_task
from autolayer.models import find_layer_stack
from autolayer.proxy import ProxyResult, ProxyRun, run_proxy
from autolayer.samplers import make_pruner, make_sampler
from autolayer.scoring import Contribution, Evaluation, References, contribution
from autolayer.spaces import (
    Candidate,
    Space,
    bind,
    grid_size,
    load_space,
    space_size,
    suggest,
    warm_start_params,
)
from autolayer.storage import (
    FINISHED,
    MAX_ATTEMPTS,
    WORKER_DIED,
    candidate_key,
    check_storage,
    claimed,
    counts,
    earlier_twin,
    exhausted_candidates,
    make_storage,
    mark_worker,
    quiet_optuna,
    recover_stale_trials,
    retry_failed,
    study_proxy_seed,
)
from autolayer.study import (
    CONTRIBUTION_OBJECTIVE,
    StudyRecord,
    TrialRecord,
    measured,
    pooled_score,
    records,
    run_estimate,
    trial_seed,
    write_study,
    write_trial,
)
from autolayer.tasks import Task
from autolayer.tracking import DEFAULT_ROOT, Tracker, check_tracking, make_tracker

WILCOXON_BLOCK = 50  # eval prompts per Wilcoxon report: a report is a storage write (~3.5 ms on
# the journal file), so per-prompt reports would add ~3.5 s to a 1,000-prompt evaluation


@dataclass
class SearchHooks:
    """Progress callbacks for a display; all optional."""

    on_message: Callable[[str], None] = lambda message: None
    on_trial_start: Callable[[int, Candidate], None] = lambda number, candidate: None
    on_eval: Callable[[int, int, float], None] = lambda number, step, score: None
    on_trial_end: Callable[[FrozenTrial], None] = lambda trial: None
    on_total: Callable[[int | None], None] = lambda total: None
    on_more: Callable[[int], None] = lambda count: None  # trials added after the search's own


@dataclass
class SearchContext:
    """Everything one worker needs to run trials of one study."""

    config: Config
    work: Workload  # the one model every trial trains in place and puts back
    space: Space
    study: optuna.Study
    tracker: Tracker
    parent_run: str
    refs: References
    hooks: SearchHooks = field(default_factory=SearchHooks)
    # How a trial trains: `proxy.run_proxy`. The search's own logic (budget, pruning, resume,
    # duplicates, racing) is tested with a fake here that returns held-out curves, no training.
    proxy_run: ProxyRun = run_proxy
    deadline: float | None = None  # time.monotonic() after which no trial starts (search.timeout)
    started: int = 0  # trials this invocation started (search.n_trials bounds them all)
    # The prompt batches' prefills below each trial's lowest trained layer, kept for the trials
    # after it (`frozen.FrozenStates`): they all start from the base weights.
    states: FrozenStates = field(default_factory=FrozenStates)

    def __post_init__(self) -> None:
        self.states.limit_mb = self.config.proxy.frozen_cache_mb

    def time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def objective_value(self, score: float) -> float:
        """The study maximises C when it is defined (an increasing map of the score), else S."""
        return self.refs.objective_value(score, self.config.search.objective)


def default_study_name(config: Config, task_name: str | None = None) -> str:
    model = re.sub(r"[^A-Za-z0-9]+", "-", Path(config.model.name).name).strip("-").lower()
    space = Path(config.search.space).stem
    return f"{model}-{task_name or config.task.name}-{space}"


def train_and_restore(
    ctx: SearchContext, layers: Sequence[int], lr: float, seed: int | None = None, **kwargs: Any
) -> ProxyResult:
    """One proxy run on the shared model (on training seed `seed`, default proxy.seed), leaving
    the model as it found it."""
    proxy = ctx.config.proxy if seed is None else dataclasses.replace(ctx.config.proxy, seed=seed)
    return ctx.proxy_run(ctx.work, proxy, layers, lr, keep=False, states=ctx.states, **kwargs)


def full_reference(ctx: SearchContext) -> Evaluation:
    """The all-layers run, measured once per study and stored in it (every worker reuses it)."""
    record = StudyRecord.of(ctx.study)
    if record.full_outcomes is not None:
        return Evaluation.from_outcomes(record.full_outcomes)
    all_layers = list(range(len(find_layer_stack(ctx.work.model))))
    lr = ctx.config.proxy.full_lr
    ctx.hooks.on_message(f"reference: training all {len(all_layers)} layers (lr {lr:g})")
    run_id = record.reference_run_id  # a killed reference run is reused
    if not run_id or not _same_store(ctx):
        run_id = ctx.tracker.start_run(
            "reference-all-layers", ctx.parent_run, {"autolayer.role": "reference"}
        )
        ctx.tracker.log_params(
            run_id, {"layers": "all", "lr": lr, **proxy_params(ctx.config, ctx.work.task.name)}
        )
        if run_id:
            write_study(ctx.study, mlflow_reference_run_id=run_id)
    try:
        result = train_and_restore(ctx, all_layers, lr, logger=ctx.tracker.lightning_logger(run_id))
    except Exception as err:  # diverged (NaN loss), out of memory, a reward that raised
        reason = _failure_reason(err)
        ctx.tracker.set_tags(run_id, {"fail_reason": reason})
        ctx.tracker.end_run(run_id, "FAILED")
        raise AutolayerError(
            f"the all-layers reference run failed ({reason}); C needs it to finish: lower "
            f"proxy.full_lr (now {lr:g}) or check the task's rewards"
        ) from err
    except BaseException:
        ctx.tracker.end_run(run_id, "KILLED")
        raise
    ctx.tracker.log_metrics(run_id, {"score": result.score, "stderr": result.final.stderr})
    ctx.tracker.end_run(run_id)
    write_study(
        ctx.study,
        reference_full_outcomes=list(result.final.outcomes),
        reference_full_score=result.score,
    )
    return result.final


def proxy_params(config: Config, task_name: str) -> dict[str, Any]:
    p = config.proxy
    return {
        "algorithm": p.algorithm,
        "steps": p.steps,
        "prompts_per_step": p.prompts_per_step,
        "num_generations": p.num_generations,
        "beta": p.beta,
        "seed": p.seed,
        "model": config.model.name,
        "task": task_name,
    }


class TrialFailed(Exception):
    """A trial that could not finish (NaN loss, out of memory, a reward function that raised)."""


def _failure_reason(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return f"out of memory: {str(err).splitlines()[0][:200]}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _pruning_hook(
    ctx: SearchContext, trial: optuna.Trial, run_id: str
) -> Callable[[int, Evaluation], bool]:
    """Report each held-out score by global step (not by epoch, as optuna-integration's Lightning
    callback would, collapsing every validation of our single epoch into one report)."""

    unprunable = TrialRecord.of(trial).queued  # a contender's repeat or a baseline runs to the end

    def hook(step: int, evaluation: Evaluation) -> bool:
        ctx.hooks.on_eval(trial.number, step, evaluation.score)
        if ctx.config.search.pruner == "wilcoxon" or step >= ctx.config.proxy.steps or unprunable:
            return False
        value = ctx.objective_value(evaluation.score)
        # The interval pruner reads the score's standard error in the objective's units.
        se = abs(ctx.objective_value(evaluation.score + evaluation.stderr) - value)
        write_trial(trial, objective_se=se)
        trial.report(value, step)
        if trial.should_prune():
            pruner = ctx.config.search.pruner
            reason = f"step {step}: score {evaluation.score:.3f} under the {pruner} pruner's bar"
            write_trial(trial, steps=step, prune_reason=reason)
            _log_stop(ctx, run_id, step, evaluation)
            return True
        return False

    return hook


def _log_stop(ctx: SearchContext, run_id: str, step: int, evaluation: Evaluation) -> None:
    """A pruned trial's MLflow run ends with where it stood: the value Optuna keeps for it."""
    metrics = {"score": evaluation.score, "stderr": evaluation.stderr}
    if ctx.refs.full_gain_defined:
        base, full = ctx.refs.base.score, ctx.refs.full.score
        metrics["contribution"] = round((evaluation.score - base) / (full - base), 4)
    ctx.tracker.log_metrics(run_id, metrics, step=step)


def _wilcoxon_check(ctx: SearchContext, trial: optuna.Trial, final: Evaluation) -> None:
    """Report paired blocks of eval prompts (same blocks for every trial) to the Wilcoxon pruner."""
    outcomes = final.outcomes
    for block, start in enumerate(range(0, len(outcomes), WILCOXON_BLOCK)):
        chunk = outcomes[start : start + WILCOXON_BLOCK]
        trial.report(ctx.objective_value(sum(chunk) / len(chunk)), block)
    if not TrialRecord.of(trial).queued and trial.should_prune():
        write_trial(
            trial,
            prune_reason="pruned: Wilcoxon test on paired eval blocks says worse than the best",
        )
        raise optuna.TrialPruned()


def _record(
    ctx: SearchContext, trial: optuna.Trial, run_id: str, result: ProxyResult
) -> Contribution:
    c = contribution(result.final, ctx.refs.base, ctx.refs.full, seed=ctx.config.proxy.seed)
    low, high, seed_df = c.low, c.high, 0
    # The interval the candidates table computes, seed term included once a candidate has a
    # repeat, so the trial, its MLflow run and the table agree.
    estimate = run_estimate(ctx.study, trial, result.final.outcomes, c.value is not None)
    if estimate is not None and c.value is not None:
        low, high, seed_df = estimate[0].low, estimate[0].high, estimate[1]
    write_trial(
        trial,
        score=result.score,
        stderr=result.final.stderr,
        steps=result.steps,
        seconds=round(result.seconds, 2),
        contribution=c.value,
        ci_low=low,
        ci_high=high,
        ci_seed_df=seed_df,
        gain=c.gain,
        outcomes=list(result.final.outcomes),
        objective_se=abs(
            ctx.objective_value(result.score + result.final.stderr)
            - ctx.objective_value(result.score)
        ),
    )
    metrics = {
        "score": result.score,
        "stderr": result.final.stderr,
        "gain": c.gain,
        "seconds": result.seconds,
    }
    if c.value is not None and low is not None and high is not None:
        # to 4 decimals, as a table column shows them (the study keeps all)
        metrics.update(
            contribution=round(c.value, 4),
            contribution_ci_low=round(low, 4),
            contribution_ci_high=round(high, 4),
        )
        metrics["contribution_ci_seed_df"] = seed_df
    ctx.tracker.log_metrics(run_id, metrics, step=result.steps)
    return c


def run_trial(ctx: SearchContext, trial: optuna.Trial) -> float:
    """The objective: one proxy run of the candidate the sampler proposes."""
    ctx.started += 1
    mark_worker(trial)
    seed = trial_seed(ctx.study, trial)  # the study's seed; repeats carry their own
    write_trial(trial, seed=seed)
    candidate = suggest(trial, ctx.space)
    if candidate is None:
        write_trial(trial, infeasible=True)  # violates the subset-size constraint: not trained
        return ctx.objective_value(ctx.refs.base.score)
    lr = candidate.lr if candidate.lr is not None else ctx.config.proxy.lr
    write_trial(trial, layers=list(candidate.layers), lr=lr)
    _check_duplicate(ctx, trial)
    _check_budget(ctx, trial)
    ctx.hooks.on_trial_start(trial.number, candidate)
    name = f"trial-{trial.number} layers={','.join(map(str, candidate.layers))}"
    tags = {
        "optuna.trial": str(trial.number),
        "autolayer.role": TrialRecord.of(trial).role or "search",
    }
    run_id = ctx.tracker.start_run(name, ctx.parent_run, tags)
    if run_id:
        write_trial(trial, mlflow_run_id=run_id, mlflow_run=ctx.tracker.run_url(run_id) or run_id)
    ctx.tracker.log_params(
        run_id,
        {
            "layers": list(candidate.layers),
            "lr": lr,
            **proxy_params(ctx.config, ctx.work.task.name),
            "seed": seed,
        },
    )
    try:
        result = train_and_restore(
            ctx,
            candidate.layers,
            lr,
            seed,
            eval_hook=_pruning_hook(ctx, trial, run_id),
            logger=ctx.tracker.lightning_logger(run_id),
        )
        if result.stopped_early:
            raise optuna.TrialPruned()
        _check_duplicate(ctx, trial)  # a twin that started in the same instant: one completes
        _record(ctx, trial, run_id, result)
        if ctx.config.search.pruner == "wilcoxon":
            _wilcoxon_check(ctx, trial, result.final)
    except optuna.TrialPruned:
        # FINISHED, not KILLED: stopping it was the search's decision, not a failure (the UI
        # draws KILLED as a red cross, and keeps it for interrupted and dead workers' runs)
        ctx.tracker.set_tags(run_id, {"trial_state": "PRUNED"})
        ctx.tracker.end_run(run_id, "FINISHED")
        raise
    except Interrupted as err:
        reason = f"interrupted by {signal.Signals(err.signum).name}"
        write_trial(trial, fail_reason=reason)
        ctx.tracker.set_tags(run_id, {"trial_state": "FAIL", "fail_reason": reason})
        ctx.tracker.end_run(run_id, "KILLED")
        raise TrialInterrupted(err.signum) from err
    except Exception as err:
        reason = _failure_reason(err)
        write_trial(trial, fail_reason=reason)
        ctx.tracker.set_tags(run_id, {"trial_state": "FAIL", "fail_reason": reason})
        ctx.tracker.end_run(run_id, "FAILED")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrialFailed(reason) from err
    ctx.tracker.set_tags(run_id, {"trial_state": "COMPLETE"})
    ctx.tracker.end_run(run_id)
    if TrialRecord.of(trial).role == "repeat":  # its candidate over every seed: `pooled_score`
        return ctx.objective_value(pooled_score(ctx.study, trial, result.score))
    return ctx.objective_value(result.score)


def steps_used(study: optuna.Study) -> int:
    """Proxy optimizer steps spent by the study's finished trials (the budget's unit)."""
    return sum(t.steps for t in records(study, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _check_duplicate(ctx: SearchContext, trial: optuna.Trial) -> None:
    """Prune this trial if an earlier one of another worker has the same exhaustive candidate
    and seed, or the same queued repeat or baseline (two racing workers may queue one twice)."""
    queued = TrialRecord.of(trial).queued
    if not queued and not isinstance(ctx.study.sampler, optuna.samplers.BruteForceSampler):
        return  # samplers that may revisit a point on purpose keep their repeats
    twin = earlier_twin(ctx.study, trial)
    if twin is not None:
        reason = f"duplicate of trial {twin}, run by another worker"
        write_trial(trial, duplicate_of=twin, prune_reason=reason)
        raise optuna.TrialPruned()


def _budget_fits(ctx: SearchContext) -> bool:
    """Whether the step budget leaves room for one more proxy run."""
    budget = ctx.config.search.max_total_steps
    return budget is None or steps_used(ctx.study) + ctx.config.proxy.steps <= budget


def can_start_trial(ctx: SearchContext) -> bool:
    """Whether n_trials, the step budget and the timeout leave room for one more proxy run."""
    n_trials = ctx.config.search.n_trials
    count = n_trials is None or ctx.started < n_trials
    return _budget_fits(ctx) and count and ctx.time_left()


def _check_budget(ctx: SearchContext, trial: optuna.Trial) -> None:
    budget = ctx.config.search.max_total_steps
    if not _budget_fits(ctx):
        reason = f"not run: the budget of {budget} proxy steps is spent"
        write_trial(trial, budget_spent=True, prune_reason=reason)  # the caller stops starting
        raise optuna.TrialPruned()


def open_study(
    config: Config,
    space: Space,
    root: Path = DEFAULT_ROOT,
    storage: Any = None,
    task_name: str | None = None,
) -> optuna.Study:
    """Create the study or resume it by name; never repeats a finished trial."""
    name = config.search.study_name or default_study_name(config, task_name)
    storage = storage if storage is not None else make_storage(config.search.storage, root)
    with quiet_optuna():  # "A new study created ...": the display says which study runs
        return optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=make_sampler(config.search.sampler, space, config.search.seed),
            pruner=make_pruner(
                config.search.pruner,
                n_warmup_steps=config.proxy.eval_every,
                final_step=config.proxy.steps,
            ),
        )


def _end_dead_runs(study: optuna.Study, tracker: Tracker) -> None:
    """The MLflow runs of trials whose worker died stay RUNNING forever: end them KILLED."""
    for number in recover_stale_trials(study):
        run_id = TrialRecord.of(study.trials[number]).mlflow_run_id
        if run_id and _tracks_to(tracker, study):
            tracker.set_tags(run_id, {"trial_state": "FAIL", "fail_reason": WORKER_DIED})
            tracker.end_run(run_id, "KILLED")


def _retry_message(retried: list[FrozenTrial]) -> str:
    """One line: which failed candidates run again, and why they failed."""
    parts = [
        f"layers {','.join(map(str, r.layers))} ({r.fail_reason or 'failed'})"
        for r in map(TrialRecord.of, retried)
    ]
    return (
        f"retrying {len(retried)} failed candidate(s), at most {MAX_ATTEMPTS} tries each: "
        + "; ".join(parts)
    )


WARM_START_CLAIM = "{study}.warm-start-claimed"  # a marker study while held; storage.claimed


def _enqueue_warm_start(ctx: SearchContext, num_layers: int, storage: Any) -> None:
    """The first trials, enqueued by exactly one worker however many start at once."""
    if ctx.study.get_trials(deepcopy=False):
        return  # a resumed study already had its warm start
    with claimed(storage, WARM_START_CLAIM.format(study=ctx.study.study_name)) as mine:
        if mine and not StudyRecord.of(ctx.study).warm_start_enqueued:  # else another worker's
            _warm_start(ctx, num_layers)
            write_study(ctx.study, warm_start_enqueued=True)


def _warm_start(ctx: SearchContext, num_layers: int) -> None:
    lr = ctx.config.proxy.lr if ctx.space.lr is not None else None
    first = ctx.config.search.warm_start
    if first is None and ctx.config.search.signal_steps and ctx.space.kind == "single_layer":
        first = _signal_order(ctx)
    for params in warm_start_params(ctx.space, first, num_layers, lr):
        ctx.study.enqueue_trial(params, skip_if_exists=True)


def _signal_order(ctx: SearchContext) -> list[int]:
    """The eligible layers by how far a short all-layers run moved them (autolayer.presignal)."""
    from autolayer.presignal import layer_signal, ranking

    steps = int(ctx.config.search.signal_steps or 0)
    ctx.hooks.on_message(f"pre-search signal: all layers for {steps} steps")
    signals = layer_signal(ctx.work, ctx.config.proxy, steps, ctx.config.proxy.full_lr)
    write_study(ctx.study, presearch_signal=[dataclasses.asdict(s) for s in signals])
    lo, hi = ctx.space.layers or (0, len(signals) - 1)  # bound by `bind`: inclusive
    return [layer for layer in ranking(signals) if lo <= layer <= hi]


def _same_store(ctx: SearchContext) -> bool:
    """Whether this worker tracks to the store the study's recorded run ids belong to."""
    return _tracks_to(ctx.tracker, ctx.study)


def _tracks_to(tracker: Tracker, study: optuna.Study) -> bool:
    uri = getattr(tracker, "tracking_uri", None)
    return uri is not None and uri == StudyRecord.of(study).tracking_uri


STUDY_TAG = "optuna.study"  # on the parent run: the study it belongs to


def _parent_run(config: Config, study: optuna.Study, tracker: Tracker, task_name: str) -> str:
    """One parent MLflow run per study, found again when the study resumes.

    MLflow names a run only once it exists, so a worker killed between making the run and
    recording it in the study leaves a RUNNING parent the study does not know: the next worker
    adopts it (by its study tag) instead of making a second one."""
    run_id = StudyRecord.of(study).parent_run_id
    if run_id and _tracks_to(tracker, study):
        return run_id
    run_id = tracker.find_run(STUDY_TAG, study.study_name) or tracker.start_run(
        f"study-{study.study_name}", tags={STUDY_TAG: study.study_name}
    )
    tracker.log_dict(run_id, config.to_dict(), "config.yaml")
    tracker.log_params(
        run_id,
        {
            "space": config.search.space,
            "objective": config.search.objective,
            "sampler": config.search.sampler,
            "pruner": config.search.pruner,
            **proxy_params(config, task_name),
        },
    )
    if run_id:
        uri = str(getattr(tracker, "tracking_uri", ""))
        write_study(study, mlflow_parent_run_id=run_id, mlflow_tracking_uri=uri)
        runs_url = tracker.runs_url()
        if runs_url is not None:  # no UI address for a Databricks store
            write_study(study, mlflow_runs=runs_url)
    return run_id


def prepare(
    config: Config,
    root: Path = DEFAULT_ROOT,
    hooks: SearchHooks | None = None,
    task: Task | None = None,
) -> SearchContext:
    """Load model, task and space, open the study and measure the references.

    `task` replaces the one `config.task` describes (the Python way to bring your own task).
    """
    hooks = hooks or SearchHooks()
    require_one_device(config.proxy)
    # Everything a user can get wrong is checked before anything is written: the space file, the
    # storage and tracking URIs (a typo fails in a second), the task's data and rewards, then the
    # model. The stores open only after that, so a refusal leaves no empty study behind.
    unbound = load_space(config.search.space)
    check_storage(config.search.storage, root)
    task = prepare_task(config, task)
    check_tracking(config.tracking.enabled, config.tracking.tracking_uri)
    work = load_for(config, task)
    num_layers = len(find_layer_stack(work.model))
    space = bind(unbound, num_layers)
    storage = make_storage(config.search.storage, root)
    study, config = _open_for(config, space, storage, work.task.name, hooks)
    tracker = make_tracker(
        config.tracking.enabled,
        config.tracking.tracking_uri,
        config.tracking.experiment or study.study_name,
        root,
    )
    _end_dead_runs(study, tracker)
    retried = retry_failed(study)
    if retried:
        hooks.on_message(_retry_message(retried))
    parent = _parent_run(config, study, tracker, work.task.name)
    hooks.on_message(
        f"study '{study.study_name}': {len(study.trials)} earlier trials, space "
        f"{config.search.space} ({space_size(space) or 'continuous'} candidates)"
    )
    with _ending_parent(tracker, parent):
        hooks.on_message(
            f"reference: scoring the base model on {len(work.task.eval)} held-out prompts"
        )
        base = base_reference(config, work, root)
        write_study(
            study, reference_base_outcomes=list(base.outcomes), reference_base_score=base.score
        )
        placeholder = References(base, base)
        ctx = SearchContext(config, work, space, study, tracker, parent, placeholder, hooks)
        ctx.refs = References(base, full_reference(ctx))
        _record_objective(ctx)
        _enqueue_warm_start(ctx, num_layers, storage)
    return ctx


def _open_for(
    config: Config, space: Space, storage: Any, task_name: str, hooks: SearchHooks
) -> tuple[optuna.Study, Config]:
    """The study, labelled for `autolayer export/train --study-name`, and the config with the
    study's proxy seed (set by its first worker)."""
    study = open_study(config, space, storage=storage, task_name=task_name)
    write_study(  # lets `autolayer export/train --study-name` stand alone
        study,
        model=config.model.name,
        task=task_name,
        model_revision=config.model.revision,
        algorithm=config.proxy.algorithm,
        space=config.search.space,
        proxy_steps=config.proxy.steps,
    )
    seed = study_proxy_seed(study, storage, config.proxy.seed)
    if seed != config.proxy.seed:
        hooks.on_message(
            f"this study trains on seed {seed}, set by its first worker, not on this "
            f"worker's proxy.seed {config.proxy.seed} (its sampler keeps search.seed)"
        )
        config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, seed=seed))
    return study, config


def _record_objective(ctx: SearchContext) -> None:
    """Log the references and name the objective: C when the all-layers run gained, else S."""
    config, study, base = ctx.config, ctx.study, ctx.refs.base
    ctx.tracker.log_metrics(
        ctx.parent_run,
        {"reference/base_score": base.score, "reference/full_score": ctx.refs.full.score},
    )
    uses_c = ctx.refs.uses_contribution(config.search.objective)
    objective = CONTRIBUTION_OBJECTIVE if uses_c else "held-out score"
    write_study(study, objective=objective, objective_origin=ctx.objective_value(base.score))
    with warnings.catch_warnings():  # experimental in Optuna, and only a label for dashboards
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective])
    if config.search.objective == "contribution" and not uses_c:
        ctx.hooks.on_message(
            "the full run's gain is within noise, so C is undefined: optimising the score"
        )


@contextlib.contextmanager
def _ending_parent(tracker: Tracker, parent: str) -> Iterator[None]:
    """End the study's parent run if the block fails, and let the failure go on: KILLED on an
    interrupt (a rerun reuses the run), FAILED otherwise. Never left RUNNING."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        tracker.end_run(parent, "KILLED")
        raise
    except Exception:
        tracker.end_run(parent, "FAILED")
        raise


def require_a_score(study: optuna.Study) -> None:
    """Refuse a study in which no trial measured a candidate: there is no table and no best to
    name, whatever the trials' states say."""
    if measured(study):
        return
    ended = Counter(
        (t.state.name.lower(), (TrialRecord.of(t).note or "no reason recorded")[:160])
        for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL))
    )
    summary = "; ".join(f"{n} {state}: {note}" for (state, note), n in ended.most_common(3))
    raise AutolayerError(
        f"no trial of study '{study.study_name}' produced a usable score "
        f"({summary or 'no trial ran'}); nothing is ranked: `autolayer results --study-name "
        f"{study.study_name} --trials` lists them"
    )


DEFAULT_TRIALS = 20  # for samplers that never exhaust their space, when --n-trials is not given


def trials_to_run(ctx: SearchContext) -> int:
    """How many trials this invocation runs: an exhaustive sampler only runs the candidates no
    earlier invocation finished, so a rerun continues and never repeats a finished trial."""
    requested = ctx.config.search.n_trials
    size = grid_size(ctx.space)  # the points BruteForceSampler walks, infeasible subsets included
    if isinstance(ctx.study.sampler, optuna.samplers.BruteForceSampler) and size is not None:
        finished = ctx.study.get_trials(deepcopy=False, states=FINISHED)
        done = {candidate_key(t) for t in finished if counts(t)} | exhausted_candidates(ctx.study)
        remaining = size - len(done)
        return max(0, remaining if requested is None else min(requested, remaining))
    return requested if requested is not None else DEFAULT_TRIALS


def optimize(ctx: SearchContext) -> optuna.Study:
    """Run trials until n_trials, the timeout, the step budget or the space runs out."""
    search = ctx.config.search
    n_trials = trials_to_run(ctx)
    ctx.hooks.on_total(n_trials)
    if n_trials == 0:
        ctx.hooks.on_message("every candidate of this space is done; nothing left to run")
        return ctx.study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("optuna").setLevel(logging.ERROR)  # failed trials are reported by our table

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        ctx.hooks.on_trial_end(trial)
        if TrialRecord.of(trial).budget_spent:
            study.stop()

    ctx.study.optimize(
        lambda trial: run_trial(ctx, trial),
        n_trials=n_trials,
        timeout=search.timeout,
        catch=(TrialFailed,),  # a failing trial is recorded with its reason; the study goes on
        callbacks=[after],
        gc_after_trial=True,
    )
    exhaustive = isinstance(ctx.study.sampler, optuna.samplers.BruteForceSampler)
    if exhaustive and ctx.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        # The exhaustive sampler stops the study once every point has a trial, failed ones
        # included, so a retry queued behind the warm start is left waiting: run it now. The bar
        # counted it already; drain adds what waits to what ran.
        from autolayer.racing import drain

        ctx.hooks.on_total(ctx.started)
        if can_start_trial(ctx):
            drain(ctx)
    return ctx.study


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep what is loaded for the whole search (libraries, model, data) out of later garbage
    collections. Optuna and the racing loop collect after every trial, to free its trainer and
    optimizer state, and a full collection over the ~567k objects of a loaded search costs
    0.20 s on 2 CPU cores (`benchmarks/gc_freeze.py`): seconds per search of short trials. A
    frozen heap is skipped by the collector, so each collection scans only what trials allocate."""
    if gc.get_freeze_count():  # the caller froze its own heap, and will unfreeze it
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # from Python, run_search may be called again: let that heap go


def run_search(
    config: Config,
    root: Path = DEFAULT_ROOT,
    hooks: SearchHooks | None = None,
    task: Task | None = None,
) -> SearchContext:
    """Prepare, optimise and finish a study (plots and summary logged to the parent run).

    `task` replaces the one `config.task` describes (the Python way to bring your own task).
    """
    start = time.perf_counter()
    ctx = prepare(config, root, hooks, task)
    if config.search.timeout is not None:
        ctx.deadline = time.monotonic() + config.search.timeout
    with _ending_parent(ctx.tracker, ctx.parent_run), frozen_heap():
        optimize(ctx)
        from autolayer.racing import measure_baselines, race

        if can_start_trial(ctx):
            measure_baselines(ctx)
        if can_start_trial(ctx):
            race(ctx)
        require_a_score(ctx.study)
    from autolayer.report import finish_study

    finish_study(ctx, root, seconds=time.perf_counter() - start)
    ctx.tracker.end_run(ctx.parent_run)
    return ctx
