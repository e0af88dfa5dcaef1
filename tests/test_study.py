"""The study record: typed reads, checked writes, outcomes stored packed and read back exactly."""

from __future__ import annotations

import optuna
import pytest

from autolayer.study import (
    CONTRIBUTION_OBJECTIVE,
    StudyRecord,
    TrialRecord,
    pack_outcomes,
    trial_fields,
    unpack_outcomes,
    write_study,
    write_trial,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0],  # not a multiple of 8
        [0.0] * 1000,
        [1 / 3, 0.5, 1.0, 0.0, 0.1 + 0.2],  # partial rewards, bit for bit
    ],
)
def test_outcomes_round_trip_exactly(values: list[float]) -> None:
    assert unpack_outcomes(pack_outcomes(values)) == tuple(values)


def test_an_accuracy_of_1000_prompts_is_one_short_line() -> None:
    """What `optuna studies` and optuna-dashboard show instead of 1,000 numbers."""
    packed = pack_outcomes([float(i % 3 == 0) for i in range(1000)])
    assert packed.startswith("bits:1000:") and len(packed) == 10 + 168


def test_lists_written_before_packing_still_read() -> None:
    assert unpack_outcomes([1, 0, 0.5]) == (1.0, 0.0, 0.5)
    assert unpack_outcomes(None) is None


def test_a_trial_reads_back_what_was_written() -> None:
    study = optuna.create_study()
    trial = study.ask()
    write_trial(trial, layers=[3, 4], lr=1e-3, seed=2, score=0.75, outcomes=[1.0, 0.0, 1.0, 1.0])
    write_trial(trial, prune_reason="step 10: under the bar", steps=10)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    record = TrialRecord.of(study.trials[0])
    assert (record.layers, record.lr, record.seed, record.score) == ((3, 4), 1e-3, 2, 0.75)
    assert record.outcomes == (1.0, 0.0, 1.0, 1.0) and record.steps == 10
    assert (
        record.state == optuna.trial.TrialState.PRUNED and record.note == "step 10: under the bar"
    )
    assert not record.queued and record.contribution is None and record.objective_se == 0.0


def test_queued_roles_and_the_study_record() -> None:
    study = optuna.create_study()
    study.enqueue_trial({"layer": 3}, user_attrs=trial_fields(seed=1, role="baseline:middle"))
    queued = TrialRecord.of(study.trials[0])
    assert queued.queued and queued.seed == 1 and queued.note == "free heuristic: middle"
    write_study(study, proxy_steps=30, reference_base_outcomes=[0.0, 1.0], baselines={"last": [7]})
    record = StudyRecord.of(study)
    assert record.proxy_steps == 30 and record.base_outcomes == (0.0, 1.0)
    assert record.baselines == {"last": (7,)} and record.full_outcomes is None
    assert not record.uses_contribution


def test_what_no_person_reads_stays_out_of_the_dashboards_attribute_tables() -> None:
    """optuna-dashboard tables user attrs: per-prompt outcomes, the pruner's bookkeeping and run
    ids are system attrs of the same storage instead, and read back the same."""
    study = optuna.create_study()
    trial = study.ask()
    write_trial(trial, layers=[3], outcomes=[1.0, 0.0], objective_se=0.1, mlflow_run_id="r1")
    assert TrialRecord.of(trial).outcomes == (1.0, 0.0)  # a live trial reads its own writes
    study.tell(trial, 0.5)
    write_study(study, model="m", reference_base_outcomes=[0.0, 1.0], objective_origin=0.0,
                mlflow_parent_run_id="p1", spectrum_snr=[0.1, 0.2])  # fmt: skip
    frozen = study.trials[0]
    assert set(frozen.user_attrs) == {"layers"} and set(study.user_attrs) == {"model"}
    record = TrialRecord.of(frozen)
    assert (record.outcomes, record.objective_se, record.mlflow_run_id) == ((1.0, 0.0), 0.1, "r1")
    srecord = StudyRecord.of(study)
    assert srecord.base_outcomes == (0.0, 1.0) and srecord.parent_run_id == "p1"
    assert srecord.objective_origin == 0.0 and srecord.spectrum_snr == (0.1, 0.2)


def test_studies_that_kept_everything_in_user_attrs_still_read() -> None:
    study = optuna.create_study()
    study.set_user_attr("reference_base_outcomes", "bits:2:QA==")  # 0b01000000: [0.0, 1.0]
    trial = study.ask()
    trial.set_user_attr("outcomes", [1.0, 1.0])
    trial.set_user_attr("mlflow_run_id", "old")
    assert StudyRecord.of(study).base_outcomes == (0.0, 1.0)
    record = TrialRecord.of(trial)
    assert record.outcomes == (1.0, 1.0) and record.mlflow_run_id == "old"


def _scored(
    study: optuna.Study, seed: int, score: float, role: str | None = None, layer: int = 7
) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_int("layer", 0, 7)
    if role:
        write_trial(trial, role=role)
    write_trial(trial, layers=[layer], lr=1e-3, seed=seed, score=score, outcomes=[score],
                contribution=score)  # fmt: skip
    return trial


def test_a_repeat_reports_its_candidate_over_every_seed() -> None:
    """Seeds 0 and 1 of layer 7 scored 0.6 and 0.7: the repeat on seed 2 that scores 0.8 reports
    (0.6 + 0.7 + 0.8) / 3 = 0.7, and its own run still reads 0.8."""
    from autolayer.study import pooled_score, ranked_trials, run_objective

    study = optuna.create_study(direction="maximize")
    write_study(study, objective=CONTRIBUTION_OBJECTIVE)
    study.tell(_scored(study, 0, 0.6), 0.6)
    study.tell(_scored(study, 1, 0.7, "repeat"), 0.65)
    repeat = _scored(study, 2, 0.8, "repeat")
    assert pooled_score(study, repeat, 0.8) == pytest.approx(0.7)
    study.tell(repeat, 0.7)
    study.tell(_scored(study, 0, 0.68, layer=6), 0.68)
    assert [run_objective(study, t) for t in study.trials] == [0.6, 0.7, 0.8, 0.68]
    # ranked by the mean of each seed's own run: layer 7's 0.7 (its values' mean is 0.65)
    assert [TrialRecord.of(t).layers for t in ranked_trials(study)] == [(7,), (6,)]
