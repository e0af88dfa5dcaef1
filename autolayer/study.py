"""The study record: what autolayer keeps in an Optuna study, and the only code that reads or
writes it.

Optuna holds a trial's params, value, state and intermediate values; everything else a search
learns is an attr of the trial (its layers, seed, score, C and why it stopped) or of the study
(the references, the model, the heuristics' picks, the answer). Writers name fields as keyword
arguments of `write_trial` / `write_study`, which mypy checks against `TrialFields` /
`StudyFields`; readers get the typed `TrialRecord` / `StudyRecord`. A field's name is its key in
storage, so studies written before this module read the same.

What a person reads is a user attr, which optuna-dashboard tables; what only the code reads
(per-prompt outcomes, the pruner's bookkeeping, MLflow run ids) is a system attr of the same
storage under `SYSTEM_PREFIX`, which the dashboard does not show and every worker still reads.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autolayer.errors import AutolayerError
from autolayer.estimate import Analysis, Estimate, analyse

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

# A measured candidate: the layers and lr its trials recorded (before any trial of it ran, the
# study knows a candidate by its Optuna params: `storage.ParamsKey`).
CandidateKey = tuple[tuple[int, ...], float]


class TrialFields(TypedDict, total=False):
    """A trial's user attrs."""

    layers: list[int]  # the trained layers (absent: the trial never got that far)
    lr: float
    seed: int  # the training seed (absent on trials from before seeds were recorded)
    role: str  # "repeat" or "baseline:<name>": queued by racing; absent for search trials
    score: float  # held-out score of the finished run
    stderr: float
    steps: int  # proxy steps it ran (pruned: where it stopped)
    seconds: float
    contribution: float | None  # C (None: undefined, the all-layers gain is within noise)
    ci_low: float | None  # C's 95% interval as the candidates table computed it when the trial
    ci_high: float | None  # finished, for a candidate run once (`run_estimate`)
    ci_seed_df: int  # that interval's seed-term df: 0 (or absent) is prompt noise only
    gain: float
    outcomes: list[float]  # per held-out prompt, paired across every run of the study
    objective_se: float  # standard error of the last reported objective (the interval pruner)
    prune_reason: str
    fail_reason: str
    infeasible: bool  # violates the subset-size limit: complete without a run
    duplicate_of: int  # another worker's twin ran it: pruned, counts for nothing
    retry_of: int  # a failed trial this one retries
    budget_spent: bool  # not run: the step budget is spent
    mlflow_run_id: str
    mlflow_run: str  # the run's page in the MLflow UI (its id where no UI address is known)
    worker_host: str
    worker_pid: int


class StudyFields(TypedDict, total=False):
    """A study's user attrs."""

    model: str
    model_revision: str | None
    task: str
    algorithm: str
    space: str
    proxy_steps: int
    proxy_seed: int  # the training seed of search trials: the first worker's
    objective: str  # "contribution C" or "held-out score"
    objective_origin: float  # the objective of the untrained model (step 0 of every curve)
    reference_base_outcomes: list[float]
    reference_base_score: float
    reference_full_outcomes: list[float]
    reference_full_score: float
    mlflow_reference_run_id: str
    mlflow_parent_run_id: str
    mlflow_tracking_uri: str
    presearch_signal: list[dict[str, Any]]
    baselines: dict[str, list[int]]  # heuristic name -> the layers it picks
    baselines_lr: float  # the lr the heuristics' picks were measured at
    spectrum_snr: list[float]  # Spectrum's score per layer
    mlflow_runs: str  # the study's runs table in the MLflow UI
    warm_start_enqueued: bool  # one worker enqueued the first trials (storage.claimed)
    pick: dict[str, Any]  # the answer: the best candidate over its seeds (`report.pick`)


CONTRIBUTION_OBJECTIVE = "contribution C"

# Per-prompt outcomes are stored packed: a list of 1,000 floats as a user attr made `optuna
# studies` and optuna-dashboard print a wall of numbers. They stay in the study's storage, not
# in a side file, because every worker of a PostgreSQL study on any machine reads every trial's
# outcomes (racing, intervals, the tied set) and a storage is all they share.
_OUTCOME_FIELDS = frozenset({"outcomes", "reference_base_outcomes", "reference_full_outcomes"})


def pack_outcomes(values: Sequence[float]) -> str:
    """`bits:N:<base64>` when every outcome is 0 or 1 (an accuracy: 1,000 in 168 characters),
    else `f64:<base64>` (exact, for partial rewards)."""
    array = np.asarray(values, dtype=np.float64)
    if np.isin(array, (0.0, 1.0)).all():
        bits = np.packbits(array.astype(np.uint8)).tobytes()
        return f"bits:{len(array)}:{base64.b64encode(bits).decode()}"
    return "f64:" + base64.b64encode(array.astype("<f8").tobytes()).decode()


def unpack_outcomes(stored: Any) -> tuple[float, ...] | None:
    """What `pack_outcomes` packed; a plain list (studies written before packing) as it is."""
    if stored is None:
        return None
    if not isinstance(stored, str):
        return tuple(float(v) for v in stored)
    kind, _, rest = stored.partition(":")
    if kind == "bits":
        count, _, data = rest.partition(":")
        bits = np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))
        return tuple(float(v) for v in bits[: int(count)])
    if kind == "f64":
        return tuple(float(v) for v in np.frombuffer(base64.b64decode(rest), dtype="<f8"))
    raise AutolayerError(f"the study holds outcomes in an unknown format ({kind!r})")


SYSTEM_PREFIX = "autolayer:"  # beside Optuna's own system attrs (`fixed_params`, ...)
# Fields no person reads, kept out of optuna-dashboard's attribute tables (a trial's 1,000
# outcomes, even packed, are 178 characters in every row).
_TRIAL_SYSTEM = frozenset({"outcomes", "objective_se", "mlflow_run_id"})
_STUDY_SYSTEM = frozenset(
    {
        "reference_base_outcomes",
        "reference_full_outcomes",
        "objective_origin",
        "presearch_signal",
        "spectrum_snr",
        "baselines_lr",
        "mlflow_parent_run_id",
        "mlflow_reference_run_id",
        "warm_start_enqueued",
    }
)


def _stored(key: str, value: Any) -> Any:
    return pack_outcomes(value) if key in _OUTCOME_FIELDS else value


def _ours(system_attrs: dict[str, Any]) -> dict[str, Any]:
    """Our fields among a trial's or study's system attrs, by field name."""
    n = len(SYSTEM_PREFIX)
    return {k[n:]: v for k, v in system_attrs.items() if k.startswith(SYSTEM_PREFIX)}


def write_trial(trial: optuna.Trial, **fields: Unpack[TrialFields]) -> None:
    for key, value in fields.items():
        if key in _TRIAL_SYSTEM:  # Trial has no public system-attr API since Optuna 3.1
            trial.storage.set_trial_system_attr(
                trial._trial_id, SYSTEM_PREFIX + key, _stored(key, value)
            )
        else:
            trial.set_user_attr(key, _stored(key, value))


def write_stored_trial(storage: Any, trial_id: int, **fields: Unpack[TrialFields]) -> None:
    """Write a trial by its storage id (also another process's: recovering a dead worker's)."""
    for key, value in fields.items():
        if key in _TRIAL_SYSTEM:
            storage.set_trial_system_attr(trial_id, SYSTEM_PREFIX + key, _stored(key, value))
        else:
            storage.set_trial_user_attr(trial_id, key, _stored(key, value))


def trial_fields(**fields: Unpack[TrialFields]) -> dict[str, Any]:
    """User attrs for `study.enqueue_trial(..., user_attrs=...)` or `create_trial`."""
    return {key: _stored(key, value) for key, value in fields.items()}


def write_study(study: optuna.Study, **fields: Unpack[StudyFields]) -> None:
    # Study has no public system-attr API since Optuna 3.1; its storage has, by the study's id.
    for key, value in fields.items():
        if key in _STUDY_SYSTEM:
            study._storage.set_study_system_attr(
                study._study_id, SYSTEM_PREFIX + key, _stored(key, value)
            )
        else:
            study.set_user_attr(key, _stored(key, value))


def _trial_attrs(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """User attrs and our system attrs (studies written before the split hold all as user attrs).
    A live trial's cached system attrs miss what its objective wrote: read them from storage."""
    if isinstance(trial, FrozenTrial):
        system = trial.system_attrs
    else:
        system = trial.storage.get_trial_system_attrs(trial._trial_id)
    return {**trial.user_attrs, **_ours(system)}


def _study_attrs(study: optuna.Study) -> dict[str, Any]:
    system = study._storage.get_study_system_attrs(study._study_id)
    return {**study.user_attrs, **_ours(system)}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class TrialRecord:
    """What a trial stored, typed; absent fields are None (or empty, or False)."""

    number: int
    state: TrialState
    value: float | None
    layers: tuple[int, ...]
    lr: float | None
    seed: int | None
    role: str | None
    score: float | None
    stderr: float | None
    steps: int
    seconds: float | None
    contribution: float | None
    ci_low: float | None
    ci_high: float | None
    ci_seed_df: int  # 0: the interval covers prompt noise only
    packed_outcomes: Any  # as stored; `outcomes` unpacks them on first use
    objective_se: float
    prune_reason: str | None
    fail_reason: str | None
    infeasible: bool
    duplicate_of: int | None
    retry_of: int | None
    budget_spent: bool
    mlflow_run_id: str | None
    mlflow_run: str | None
    worker_host: str | None
    worker_pid: int | None

    @classmethod
    def of(cls, trial: FrozenTrial | optuna.Trial) -> TrialRecord:
        a = cast("TrialFields", _trial_attrs(trial))
        state, value = (
            (trial.state, trial.value)
            if isinstance(trial, FrozenTrial)
            else (TrialState.RUNNING, None)  # a live trial, in its objective
        )
        return cls(
            number=trial.number,
            state=state,
            value=value,
            layers=tuple(a.get("layers", ())),
            lr=_float(a.get("lr")),
            seed=_int(a.get("seed")),
            role=a.get("role"),
            score=_float(a.get("score")),
            stderr=_float(a.get("stderr")),
            steps=int(a.get("steps", 0)),
            seconds=_float(a.get("seconds")),
            contribution=_float(a.get("contribution")),
            ci_low=_float(a.get("ci_low")),
            ci_high=_float(a.get("ci_high")),
            ci_seed_df=int(a.get("ci_seed_df", 0)),
            packed_outcomes=a.get("outcomes"),
            objective_se=float(a.get("objective_se", 0.0)),
            prune_reason=a.get("prune_reason"),
            fail_reason=a.get("fail_reason"),
            infeasible=bool(a.get("infeasible", False)),
            duplicate_of=_int(a.get("duplicate_of")),
            retry_of=_int(a.get("retry_of")),
            budget_spent=bool(a.get("budget_spent", False)),
            mlflow_run_id=a.get("mlflow_run_id"),
            mlflow_run=a.get("mlflow_run"),
            worker_host=a.get("worker_host"),
            worker_pid=_int(a.get("worker_pid")),
        )

    @functools.cached_property
    def outcomes(self) -> tuple[float, ...] | None:
        """Per held-out prompt; unpacked only by the readers that need them (most read a seed
        or a reason, and a study's trials are read many times over)."""
        return unpack_outcomes(self.packed_outcomes)

    @property
    def queued(self) -> bool:
        """A racing repeat or a baseline: queued with its params and seed, never pruned."""
        return self.role is not None

    @property
    def note(self) -> str:
        """Why the trial ended as it did, or what it was for, in a few words."""
        for reason in (self.fail_reason, self.prune_reason):
            if reason:
                return reason
        if self.infeasible:
            return "infeasible: violates the subset size limit"
        if self.retry_of is not None:
            return f"retry of trial {self.retry_of}"
        if self.role == "repeat":
            return "racing: repeat on another training seed"
        if self.role and self.role.startswith("baseline:"):
            return f"free heuristic: {self.role.split(':', 1)[1]}"
        return ""


@dataclass(frozen=True)
class StudyRecord:
    """What a study stored about itself, typed."""

    model: str | None
    model_revision: str | None
    task: str | None
    algorithm: str | None
    proxy_steps: int | None
    proxy_seed: int | None
    objective: str | None
    objective_origin: float | None
    packed_base_outcomes: Any  # as stored; `base_outcomes` unpacks them on first use
    base_score: float | None
    packed_full_outcomes: Any
    full_score: float | None
    reference_run_id: str | None
    parent_run_id: str | None
    tracking_uri: str | None
    baselines: dict[str, tuple[int, ...]]
    baselines_lr: float | None
    spectrum_snr: tuple[float, ...] | None
    presearch_signal: list[dict[str, Any]] | None
    warm_start_enqueued: bool
    pick: dict[str, Any] | None
    runs_url: str | None

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        a = cast("StudyFields", _study_attrs(study))
        snr = a.get("spectrum_snr")
        return cls(
            model=a.get("model"),
            model_revision=a.get("model_revision"),
            task=a.get("task"),
            algorithm=a.get("algorithm"),
            proxy_steps=_int(a.get("proxy_steps")),
            proxy_seed=_int(a.get("proxy_seed")),
            objective=a.get("objective"),
            objective_origin=_float(a.get("objective_origin")),
            packed_base_outcomes=a.get("reference_base_outcomes"),
            base_score=_float(a.get("reference_base_score")),
            packed_full_outcomes=a.get("reference_full_outcomes"),
            full_score=_float(a.get("reference_full_score")),
            reference_run_id=a.get("mlflow_reference_run_id"),
            parent_run_id=a.get("mlflow_parent_run_id"),
            tracking_uri=a.get("mlflow_tracking_uri"),
            baselines={k: tuple(v) for k, v in a.get("baselines", {}).items()},
            baselines_lr=_float(a.get("baselines_lr")),
            spectrum_snr=None if snr is None else tuple(float(v) for v in snr),
            presearch_signal=a.get("presearch_signal"),
            warm_start_enqueued=bool(a.get("warm_start_enqueued", False)),
            pick=a.get("pick"),
            runs_url=a.get("mlflow_runs"),
        )

    @functools.cached_property
    def base_outcomes(self) -> tuple[float, ...] | None:
        return unpack_outcomes(self.packed_base_outcomes)

    @functools.cached_property
    def full_outcomes(self) -> tuple[float, ...] | None:
        return unpack_outcomes(self.packed_full_outcomes)

    @property
    def uses_contribution(self) -> bool:
        """Whether the study maximises C, as `scoring.References.uses_contribution` decided when
        the search recorded its objective: read back, never decided again from storage."""
        return self.objective == CONTRIBUTION_OBJECTIVE


def records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """Every trial of `study` (of `states`), in trial order."""
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]


def trial_seed(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> int:
    """The training seed a trial ran (or will run) on. Trials from before seeds were recorded,
    and queued search trials, run on the study's proxy seed."""
    seed = TrialRecord.of(trial).seed
    if seed is not None:
        return seed
    study_seed = StudyRecord.of(study).proxy_seed
    return 0 if study_seed is None else study_seed


def measured(study: optuna.Study) -> dict[CandidateKey, dict[int, FrozenTrial]]:
    """Every completed candidate's trials by seed (the first trial of a seed, if TPE repeats)."""
    runs: dict[CandidateKey, dict[int, FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        if record.outcomes is None or record.lr is None:
            continue  # infeasible subsets are complete without a run
        key = (record.layers, record.lr)
        runs.setdefault(key, {}).setdefault(trial_seed(study, trial), trial)
    return runs


def _measured_outcomes(study: optuna.Study) -> dict[CandidateKey, np.ndarray]:
    """Each completed candidate's (seeds, prompts) outcomes; refused if held-out sets differ."""
    base = StudyRecord.of(study).base_outcomes or ()
    outcomes_of = {
        key: [TrialRecord.of(by_seed[s]).outcomes or () for s in sorted(by_seed)]
        for key, by_seed in measured(study).items()
    }
    lengths = {len(o) for rows in outcomes_of.values() for o in rows}
    if lengths - {len(base)}:
        raise AutolayerError(
            f"study '{study.study_name}' holds trials scored on different held-out sets "
            f"({', '.join(map(str, sorted(lengths | {len(base)})))} prompts); use a new study name"
        )
    return {key: np.array(rows, dtype=float) for key, rows in outcomes_of.items()}


def _analyse(
    study: optuna.Study, runs: Mapping[Any, np.ndarray], contribution_defined: bool
) -> Analysis[Any]:
    record = StudyRecord.of(study)
    full = record.full_outcomes
    return analyse(
        runs,
        np.asarray(record.base_outcomes, dtype=float),
        None if full is None else np.asarray([full], dtype=float),
        contribution_defined=contribution_defined,
    )


def pooled_score(study: optuna.Study, trial: optuna.Trial, score: float) -> float:
    """The held-out score of `trial`'s candidate averaged over its training seeds, this run's
    `score` included. A racing repeat reports it as its value, so the study's best trial in
    Optuna (and optuna-dashboard) is a candidate over its seeds, as the results table ranks
    candidates, not the luckier seed of the pick."""
    record, seed = TrialRecord.of(trial), trial_seed(study, trial)
    by_seed = {} if record.lr is None else measured(study).get((record.layers, record.lr), {})
    others = [TrialRecord.of(t).score for s, t in by_seed.items() if s != seed]
    scores = [s for s in others if s is not None] + [score]
    return sum(scores) / len(scores)


def run_objective(study: optuna.Study, trial: FrozenTrial) -> float | None:
    """The objective of the trial's own run: its value, except for a racing repeat, whose value
    is its candidate's over every seed (`pooled_score`)."""
    record = TrialRecord.of(trial)
    if record.role != "repeat":
        return trial.value
    own = record.contribution if StudyRecord.of(study).uses_contribution else record.score
    return trial.value if own is None else own


def study_analysis(study: optuna.Study) -> Analysis[CandidateKey] | None:
    """Estimates, best and tied set of a study's completed candidates, from storage alone.

    The resampling seed is fixed, so racing, the table and `autolayer results` agree on the tied
    set."""
    if StudyRecord.of(study).base_outcomes is None:
        return None
    runs = _measured_outcomes(study)
    if not runs:
        return None
    return _analyse(study, runs, StudyRecord.of(study).uses_contribution)


_THIS_RUN = "this run"  # the key of the run `run_estimate` adds to the study's candidates


def run_estimate(
    study: optuna.Study,
    trial: FrozenTrial | optuna.Trial,
    outcomes: Sequence[float],
    contribution_defined: bool,
) -> tuple[Estimate, int] | None:
    """The interval the candidates table gives a candidate run once with these outcomes (the
    trial's, before it completes) beside the study's completed runs, and the seed term's degrees
    of freedom (0: no candidate has a repeat yet, so it covers prompt noise only). A repeat adds
    its own seed to the pooled variance, as the table will. None without the base reference."""
    if StudyRecord.of(study).base_outcomes is None:
        return None
    runs: dict[Any, np.ndarray] = dict(_measured_outcomes(study))
    record = TrialRecord.of(trial)
    key, this = (record.layers, float(record.lr or 0.0)), np.asarray([outcomes], dtype=float)
    by_seed = measured(study).get(key, {})
    if by_seed and trial_seed(study, trial) not in by_seed:
        runs[key] = np.concatenate([runs[key], this])
    runs[_THIS_RUN] = this
    analysis = _analyse(study, runs, contribution_defined)
    return analysis.estimates[_THIS_RUN], analysis.seed_df


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The first completed trial of the best candidate (best mean score over its seeds)."""
    analysis = study_analysis(study)
    if analysis is None or analysis.best is None:
        return None
    return min(measured(study)[analysis.best].values(), key=lambda t: t.number)


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """One COMPLETE trial per candidate (layers and lr) that trained layers, the candidate with
    the best objective averaged over its training seeds first (ties: earlier trial). A seed's
    first trial counts once, as in the results table."""
    groups: dict[tuple[tuple[int, ...], float | None], dict[int, FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(t)
        if t.value is not None and record.layers and not record.infeasible:
            key = (record.layers, record.lr)
            groups.setdefault(key, {}).setdefault(trial_seed(study, t), t)

    def mean(trials: list[FrozenTrial]) -> float:
        return sum(cast(float, run_objective(study, t)) for t in trials) / len(trials)

    ordered = sorted(
        (list(by_seed.values()) for by_seed in groups.values()),
        key=lambda ts: (-mean(ts), ts[0].number),
    )
    return [trials[0] for trials in ordered]


def study_evidence(
    study: optuna.Study, layers: tuple[int, ...], storage: str
) -> tuple[dict[str, Any], float | None]:
    """The study's results behind a choice of `layers` (for an export's provenance), and the lr
    of the best trial of exactly these layers. Each candidate carries the candidates table's
    numbers: its mean over seeds and intervals with the seed term when the study has one."""
    analysis = study_analysis(study)
    chosen, seen, trials = set(layers), set(), []
    lr = None
    for trial in ranked_trials(study):
        r = TrialRecord.of(trial)
        trained = tuple(sorted(r.layers))
        if not set(trained) <= chosen or trained in seen:
            continue  # keep the best trial of each subset of the chosen layers
        seen.add(trained)
        if trained == layers and lr is None:
            lr = r.lr
        entry = {
            "trial": trial.number,
            "layers": list(trained),
            "objective": trial.value,
            "lr": r.lr,
            "score": r.score,
            "contribution": r.contribution,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
        }
        estimate = None if analysis is None else analysis.estimates.get((r.layers, r.lr or 0.0))
        if estimate is not None:
            entry.update(
                seeds=estimate.seeds,
                score=estimate.score,
                score_low=estimate.score_low,
                score_high=estimate.score_high,
                contribution=estimate.contribution,
                ci_low=estimate.low,
                ci_high=estimate.high,
            )
        trials.append(entry)
    record = StudyRecord.of(study)
    evidence = {
        "source": "autolayer search",
        "study": study.study_name,
        "storage": storage,
        "reference_base_score": record.base_score,
        "reference_full_score": record.full_score,
        "trials": trials,
    }
    if analysis is not None:
        evidence["intervals"] = analysis.method
        evidence["seed_noise_included"] = analysis.seed_df > 0
    return evidence, lr
