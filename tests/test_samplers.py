"""Samplers and pruners, driven by fake objectives: no training."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from optuna.samplers import BruteForceSampler, GPSampler, RandomSampler, TPESampler

from autolayer.config import SamplerName
from autolayer.errors import AutolayerError
from autolayer.samplers import make_pruner, make_sampler, optimistic_final
from autolayer.spaces import Candidate, LrRange, Space, bind, suggest
from autolayer.study import trial_fields, write_study, write_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(space: Space, sampler: SamplerName, seed: int = 0) -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=make_sampler(sampler, space, seed))


def _objective(
    space: Space, score: Callable[[Candidate], float], seen: list[Candidate | None]
) -> Callable[[optuna.Trial], float]:
    """A stand-in for a proxy run; an infeasible subset is told 0.0 without "training"."""

    def objective(trial: optuna.Trial) -> float:
        candidate = suggest(trial, space)
        seen.append(candidate)
        return 0.0 if candidate is None else score(candidate)

    return objective


# ---------------------------------------------------------------- choosing a sampler


@pytest.mark.parametrize(
    ("space", "num_layers", "expected"),
    [
        (Space("single_layer"), 8, BruteForceSampler),
        (Space("single_layer"), 65, TPESampler),  # 65 points: over the limit
        (Space("window", max_width=4), 8, BruteForceSampler),  # 26 windows
        (Space("single_layer", lr=(1e-3, 3e-3)), 32, BruteForceSampler),  # 64 points
        (Space("single_layer", lr=LrRange(1e-4, 1e-2)), 8, TPESampler),  # continuous
        (Space("subset", (0, 5)), 8, BruteForceSampler),  # 2^6 yes/no vectors
        (Space("subset", (0, 6)), 8, TPESampler),  # 2^7
    ],
)
def test_auto_walks_small_grids_and_uses_tpe_otherwise(
    space: Space, num_layers: int, expected: type
) -> None:
    assert type(make_sampler("auto", bind(space, num_layers), seed=0)) is expected


def test_named_samplers() -> None:
    space = bind(Space("single_layer"), 8)
    expected: list[tuple[SamplerName, type]] = [
        ("grid", BruteForceSampler),
        ("tpe", TPESampler),
        ("gp", GPSampler),
        ("random", RandomSampler),
    ]
    for name, cls in expected:
        assert type(make_sampler(name, space, seed=0)) is cls
    ranged = bind(Space("single_layer", lr=LrRange(1e-4, 1e-2)), 8)
    with pytest.raises(AutolayerError, match="list lr choices in the search space instead"):
        make_sampler("grid", ranged, seed=0)


# ---------------------------------------------------------------- exhaustive search


def test_grid_visits_each_layer_once_then_stops_the_study() -> None:
    space = bind(Space("single_layer"), 8)
    seen: list[Candidate | None] = []
    study = _study(space, "auto")
    study.optimize(_objective(space, lambda c: 0.0, seen), n_trials=20)  # the grid stops at 8
    assert len(study.trials) == 8
    assert sorted(c.layers for c in seen if c is not None) == [(i,) for i in range(8)]


def test_grid_enumerates_every_window_of_the_dynamic_start_range() -> None:
    space = bind(Space("window", min_width=1, max_width=2), 4)
    seen: list[Candidate | None] = []
    _study(space, "grid").optimize(_objective(space, lambda c: 0.0, seen), n_trials=20)
    assert sorted(c.layers for c in seen if c is not None) == [
        (0,), (0, 1), (1,), (1, 2), (2,), (2, 3), (3,),
    ]  # fmt: skip


# ---------------------------------------------------------------- model-based search


def test_tpe_finds_a_peak_at_layer_5_of_28_within_30_trials() -> None:
    space = bind(Space("single_layer"), 28)
    seen: list[Candidate | None] = []
    study = _study(space, "tpe", seed=0)
    study.optimize(_objective(space, lambda c: -((c.layers[0] - 5) ** 2), seen), n_trials=30)
    assert study.best_params == {"layer": 5}


def _more_is_better(candidate: Candidate) -> float:
    """Rewards every extra layer, so only the constraint stops a sampler from taking them all."""
    return len(candidate.layers) + 0.1 * (5 in candidate.layers)


@pytest.mark.parametrize(
    "sampler",
    ["tpe", pytest.param("gp", marks=pytest.mark.slow)],  # GP: ~1 s a trial on 2 CPU cores
)
def test_subset_samplers_learn_the_constraint(sampler: SamplerName) -> None:
    space = bind(Space("subset", max_layers=2), 8)
    seen: list[Candidate | None] = []
    study = _study(space, sampler, seed=0)
    study.optimize(_objective(space, _more_is_better, seen), n_trials=40)
    best = study.best_trial  # Optuna picks the best among feasible trials only
    assert all(value <= 0 for value in best.constraints.values())
    assert best.value == 2.1  # two layers, one of them layer 5
    # Random start-up (10 trials) is mostly infeasible; the model then learns to stay feasible.
    assert sum(c is not None for c in seen[20:]) > 2 * sum(c is not None for c in seen[:10])


# ---------------------------------------------------------------- pruners


def test_pruner_names() -> None:
    assert type(make_pruner("none")) is optuna.pruners.NopPruner
    assert type(make_pruner("median", n_warmup_steps=5)) is optuna.pruners.MedianPruner
    assert type(make_pruner("hyperband", n_warmup_steps=10)) is optuna.pruners.HyperbandPruner
    assert type(make_pruner("wilcoxon")) is optuna.pruners.WilcoxonPruner


def test_median_prunes_a_trial_far_below_two_finished_ones() -> None:
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median"))
    for final in (0.8, 0.9):
        trial = study.ask()
        for step in (10, 20, 30):  # held-out score by global step
            trial.report(final * step / 30, step)
        study.tell(trial, final)
    good, bad = study.ask(), study.ask()
    good.report(0.5, 10)
    bad.report(0.05, 10)
    assert not good.should_prune()
    assert bad.should_prune()


def test_wilcoxon_prunes_a_trial_clearly_worse_on_the_same_prompts() -> None:
    study = optuna.create_study(direction="maximize", pruner=make_pruner("wilcoxon"))
    best = [0.9, 0.6, 0.8, 0.3, 0.7, 0.5, 0.9, 0.4]  # per-prompt mean reward
    trial = study.ask()
    for prompt, value in enumerate(best):
        trial.report(value, prompt)
    study.tell(trial, sum(best) / len(best))

    trial = study.ask()
    pruned_at = None
    for prompt in (5, 2, 7, 0, 3, 1, 6, 4):  # any order: steps pair prompts across trials
        trial.report(best[prompt] - 0.2, prompt)
        if trial.should_prune():
            pruned_at = prompt
            break
    # All 4 paired differences negative: one-sided p = 1/2^4 = 0.0625 < 0.1 (3 give 0.125).
    assert pruned_at == 0


# ---------------------------------------------------------------- interval pruner


def _interval_study(best: float, best_se: float, origin: float) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=make_pruner("interval", 10, 30))
    write_study(study, objective_origin=origin)
    trial = study.ask()
    write_trial(trial, objective_se=best_se)
    study.tell(trial, best)
    return study


def _report(study: optuna.Study, curve: dict[int, float], se: float) -> bool:
    trial = study.ask()
    pruned = False
    for step, value in curve.items():
        write_trial(trial, objective_se=se)
        trial.report(value, step)
        pruned = trial.should_prune()
    return pruned


def test_interval_pruner_keeps_a_slow_starter_that_is_still_climbing() -> None:
    """0.50 at step 10 from 0.30 at step 0: +0.02 a step projects 0.90 at step 30, above the
    best's 0.80 - 1.96 x 0.01; a median pruner compares 0.50 with 0.80 and stops it."""
    study = _interval_study(best=0.80, best_se=0.01, origin=0.30)
    assert not _report(study, {10: 0.50}, se=0.01)
    median = optuna.create_study(direction="maximize", pruner=make_pruner("median", 10))
    for early, final in ((0.75, 0.80), (0.70, 0.79)):
        done = median.ask()
        done.report(early, 10)
        median.tell(done, final)
    late = median.ask()
    late.report(0.50, 10)
    assert late.should_prune()


def test_interval_pruner_stops_a_flat_curve_below_the_bar() -> None:
    """0.35 then 0.36: the steeper slope, 0.06 / 20 from step 0, projects 0.39 + 1.96 x 0.015."""
    study = _interval_study(best=0.80, best_se=0.01, origin=0.30)
    assert _report(study, {10: 0.35, 20: 0.36}, se=0.015)


def test_interval_pruner_counts_noise_on_both_sides() -> None:
    """Projected 0.74 + 1.96 x 0.02 = 0.779 clears 0.80 - 1.96 x 0.02 = 0.761: kept."""
    study = _interval_study(best=0.80, best_se=0.02, origin=0.74)
    assert not _report(study, {10: 0.74, 20: 0.74}, se=0.02)


def test_optimistic_final_by_hand() -> None:
    trial = optuna.trial.create_trial(
        value=None,
        state=optuna.trial.TrialState.RUNNING,
        intermediate_values={10: 0.4, 20: 0.6},
        user_attrs=trial_fields(objective_se=0.01),
    )
    # slopes: since origin (0.6 - 0.3) / 20 = 0.015, last segment 0.02: 0.6 + 0.02 x 10 + 0.0196
    assert optimistic_final(trial, 30, origin=0.3) == pytest.approx(0.8196)
