"""Running a study: open it, measure its references, run the search's trials, race the
contenders, and close it with the report.

A study is opened, or resumed, by name; every worker that joins it shares one warm start, one
training seed and one MLflow parent run. The base model and the all-layers run are the references
for `C`: the base score is cached on disk per (model, task, eval set), the full run once per
study. `autolayer.search` runs one trial, `autolayer.racing` the repeats and baselines after the
search, and `autolayer.report` makes the plots and the answer this module logs to the parent run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autolayer.config import Config, require_one_device
from autolayer.errors import AutolayerError, Interrupted
from autolayer.loading import base_reference, load_for, prepare_task
from autolayer.models import find_layer_stack
from autolayer.presignal import layer_signal, ranking
from autolayer.racing import drain, measure_baselines, race
from autolayer.report import (
    answer_line,
    answer_value,
    candidate_rows,
    dashboard_note,
    pick,
    plot_contributions,
    plot_history,
    results_json,
    save_dashboard_note,
    study_dir,
)
from autolayer.samplers import make_pruner, make_sampler
from autolayer.scoring import Evaluation, References
from autolayer.search import (
    SearchContext,
    SearchHooks,
    TrialFailed,
    can_start_trial,
    failure_reason,
    proxy_params,
    run_trial,
    train_and_restore,
)
from autolayer.spaces import Space, bind, grid_size, load_space, space_size, warm_start_params
from autolayer.storage import (
    FINISHED,
    MAX_ATTEMPTS,
    WORKER_DIED,
    check_storage,
    claimed,
    counts,
    exhausted_candidates,
    make_storage,
    params_key,
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
    write_study,
)
from autolayer.tasks import Task
from autolayer.tracking import DEFAULT_ROOT, Tracker, check_tracking, make_tracker


def default_study_name(config: Config, task_name: str | None = None) -> str:
    model = re.sub(r"[^A-Za-z0-9]+", "-", Path(config.model.name).name).strip("-").lower()
    space = Path(config.search.space).stem
    return f"{model}-{task_name or config.task.name}-{space}"


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
        reason = failure_reason(err)
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
    steps = int(ctx.config.search.signal_steps or 0)
    ctx.hooks.on_message(f"pre-search signal: all layers for {steps} steps")
    signals = layer_signal(ctx.work, ctx.config.proxy, steps, ctx.config.proxy.full_lr)
    write_study(ctx.study, presearch_signal=[dataclasses.asdict(s) for s in signals])
    eligible = set(ctx.space.eligible)  # bound by `bind`: a stride's grid, not every layer
    return [layer for layer in ranking(signals) if layer in eligible]


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
        done = {params_key(t) for t in finished if counts(t)} | exhausted_candidates(ctx.study)
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
    """Prepare (`task` as there), optimise and finish a study: plots and summary logged to
    the parent run."""
    start = time.perf_counter()
    ctx = prepare(config, root, hooks, task)
    if config.search.timeout is not None:
        ctx.deadline = time.monotonic() + config.search.timeout
    with _ending_parent(ctx.tracker, ctx.parent_run), frozen_heap():
        optimize(ctx)
        if can_start_trial(ctx):
            measure_baselines(ctx)
        if can_start_trial(ctx):
            race(ctx)
        require_a_score(ctx.study)
    finish_study(ctx, root, seconds=time.perf_counter() - start)
    ctx.tracker.end_run(ctx.parent_run)
    return ctx


def finish_study(ctx: SearchContext, root: Path, seconds: float) -> list[Path]:
    """Write the plots beside the store and log them, with a summary, to the study's parent run."""
    out = study_dir(root, ctx.study.study_name)
    paths = [
        p
        for p in (
            plot_contributions(ctx.study, out / "contribution.png"),
            plot_history(ctx.study, out / "history.png"),
        )
        if p is not None
    ]
    for path in paths:
        ctx.tracker.log_artifact(ctx.parent_run, path)
    rows, analysis = candidate_rows(ctx.study)
    if analysis is not None:
        ctx.tracker.log_dict(ctx.parent_run, results_json(ctx.study), "candidates.json")
    summary: dict[str, Any] = {"search/seconds": seconds, "search/trials": len(ctx.study.trials)}
    answer = pick(ctx.study)
    if answer is not None:
        write_study(ctx.study, pick=answer)
        value, low, high = answer_value(answer)
        summary.update({"search/best": value, "search/best_low": low, "search/best_high": high})
        ctx.tracker.set_tags(
            ctx.parent_run,
            {
                "best_layers": ",".join(map(str, answer["layers"])),
                "mlflow.note.content": "The answer: " + answer_line(ctx.study, answer),
            },  # the run's description in the MLflow UI
        )
        save_dashboard_note(ctx.study, dashboard_note(ctx.study, answer))
    ctx.tracker.log_metrics(ctx.parent_run, summary)
    return paths
