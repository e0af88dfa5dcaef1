"""One trial of the layer search: a proxy RL run of the layer subset Optuna proposes.

Every trial trains its layers of the one loaded model in place and puts the original values back
afterwards (only the trained layers' values are kept aside, so the memory cost is one copy of
those layers). A trial reports its held-out scores to the pruner, records its C in the study and
its metrics in MLflow, and starts only while n_trials, the step budget and the timeout leave
room. `autolayer.runner` opens the study and runs its trials.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autolayer.config import Config
from autolayer.errors import Interrupted, TrialInterrupted
from autolayer.estimate import contribution_ratio
from autolayer.frozen import FrozenStates
from autolayer.loading import Workload
from autolayer.proxy import ProxyResult, ProxyRun, run_proxy
from autolayer.scoring import Contribution, Evaluation, References, contribution
from autolayer.spaces import Candidate, Space, suggest
from autolayer.storage import earlier_twin, mark_worker
from autolayer.study import (
    TrialRecord,
    pooled_score,
    records,
    run_estimate,
    trial_seed,
    write_trial,
)
from autolayer.tracking import Tracker

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


def train_and_restore(
    ctx: SearchContext, layers: Sequence[int], lr: float, seed: int | None = None, **kwargs: Any
) -> ProxyResult:
    """One proxy run on the shared model (on training seed `seed`, default proxy.seed), leaving
    the model as it found it."""
    proxy = ctx.config.proxy if seed is None else dataclasses.replace(ctx.config.proxy, seed=seed)
    return ctx.proxy_run(ctx.work, proxy, layers, lr, keep=False, states=ctx.states, **kwargs)


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


def failure_reason(err: BaseException) -> str:
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
        c = contribution_ratio(evaluation.score, ctx.refs.base.score, ctx.refs.full.score)
        metrics["contribution"] = round(c, 4)
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
        reason = failure_reason(err)
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
