"""Racing over seeds and the baseline runs, driven by a fake proxy run: no training."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from autolayer import racing
from autolayer import study as study_record
from autolayer.config import Config
from autolayer.search import SearchHooks
from autolayer.spaces import bind, space_from_dict, suggest
from autolayer.study import (
    CONTRIBUTION_OBJECTIVE,
    StudyRecord,
    TrialRecord,
    trial_fields,
    write_study,
    write_trial,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
N = 400  # held-out prompts


def outcomes(p: float, offset: int = 0) -> list[float]:
    out = np.zeros(N)
    out[(offset + np.arange(round(p * N))) % N] = 1.0
    return out.tolist()


class FakeProxy:
    """Held-out outcomes of layer l on seed s: `truth[l]` plus a seed shift of +-`seed_sd`."""

    def __init__(self, truth: dict[int, float], seed_sd: float, fail_at: int | None = None):
        self.truth, self.seed_sd, self.fail_at = truth, seed_sd, fail_at
        self.calls: list[tuple[int, int]] = []

    def __call__(self, ctx: Any, trial: optuna.Trial) -> float:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # the search is killed mid-race
        candidate = suggest(trial, ctx.space)
        assert candidate is not None
        layer, seed = candidate.layers[0], TrialRecord.of(trial).seed or 0
        self.calls.append((layer, seed))
        shift = self.seed_sd * (1, -1, 0.5, -0.5, 0)[seed % 5]
        score_p = self.truth[layer] + shift
        write_trial(trial, layers=[layer], lr=1e-3, seed=seed, outcomes=outcomes(score_p), steps=30)
        return score_p


def make_ctx(seeds: int = 3, baselines: bool = True) -> Any:
    config = Config()
    config.search.seeds, config.search.baselines = seeds, baselines
    study = optuna.create_study(direction="maximize")
    write_study(
        study,
        reference_base_outcomes=outcomes(0.5),
        reference_full_outcomes=outcomes(0.8),
        objective=CONTRIBUTION_OBJECTIVE,
        spectrum_snr=[0.1, 0.2, 0.9, 0.3, 0.4, 0.5, 0.6, 0.7],
    )
    space = bind(space_from_dict({"kind": "single_layer"}), 8)
    return SimpleNamespace(
        config=config, study=study, space=space, hooks=SearchHooks(), time_left=lambda: True
    )


def first_pass(ctx: Any, layers: list[int]) -> None:
    for layer in layers:
        ctx.study.enqueue_trial({"layer": layer}, user_attrs=trial_fields(seed=0))
    racing.drain(ctx)


def seeds_by_layer(ctx: Any) -> dict[int, list[int]]:
    return {key[0][0]: sorted(runs) for key, runs in study_record.measured(ctx.study).items()}


TRUTH = {0: 0.55, 1: 0.6, 2: 0.65, 3: 0.7, 4: 0.72, 5: 0.74, 6: 0.76, 7: 0.78}


def test_a_separated_best_gets_one_repeat_and_the_rest_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = {**TRUTH, 7: 0.95}
    monkeypatch.setattr(racing, "run_trial", FakeProxy(truth, seed_sd=0.005))
    ctx = make_ctx()
    first_pass(ctx, list(range(8)))
    racing.race(ctx)
    seeds = seeds_by_layer(ctx)
    assert seeds[7] == [0, 1] and seeds[6] == [0, 1]  # the first round: the best two
    assert all(seeds[layer] == [0] for layer in range(6))
    analysis = study_record.study_analysis(ctx.study)
    assert analysis is not None and analysis.tied == {((7,), 1e-3)}


def test_close_contenders_race_to_the_seed_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = {**TRUTH, 6: 0.80, 7: 0.80}
    fake = FakeProxy(truth, seed_sd=0.04)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx(seeds=3)
    first_pass(ctx, list(range(8)))
    racing.race(ctx)
    seeds = seeds_by_layer(ctx)
    analysis = study_record.study_analysis(ctx.study)
    assert analysis is not None
    tied_layers = {key[0][0] for key in analysis.tied}
    assert {6, 7} <= tied_layers
    pool = {4, 5, 6, 7}  # search.contenders = 4, by their first run
    for layer in tied_layers:
        assert seeds[layer] == ([0, 1, 2] if layer in pool else [0])  # contenders reach the limit
    assert max(Counter(fake.calls).values()) == 1  # no (layer, seed) ran twice


def test_seeds_1_never_races(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProxy(TRUTH, seed_sd=0.04)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx(seeds=1)
    first_pass(ctx, list(range(8)))
    racing.race(ctx)
    assert len(fake.calls) == 8


def test_a_killed_race_resumes_without_rerunning_finished_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = {**TRUTH, 6: 0.80, 7: 0.80}
    ctx = make_ctx(seeds=3)
    monkeypatch.setattr(racing, "run_trial", FakeProxy(truth, seed_sd=0.04))
    first_pass(ctx, list(range(8)))
    killer = FakeProxy(truth, seed_sd=0.04, fail_at=1)  # dies on its second run
    monkeypatch.setattr(racing, "run_trial", killer)
    with pytest.raises(KeyboardInterrupt):
        racing.race(ctx)
    assert [t.state for t in ctx.study.trials].count(TrialState.FAIL) == 1
    resumed = FakeProxy(truth, seed_sd=0.04)
    monkeypatch.setattr(racing, "run_trial", resumed)
    racing.race(ctx)
    done = [(layer, s) for layer, seeds in seeds_by_layer(ctx).items() for s in seeds]
    assert len(done) == len(set(done))
    assert killer.calls[0] not in resumed.calls  # the repeat that finished before the kill


def test_baselines_measure_the_heuristics_picks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProxy(TRUTH, seed_sd=0.0)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx()
    first_pass(ctx, [3, 4, 6, 7])  # 0, 1, 2, 5 never completed (pruned, say)
    racing.measure_baselines(ctx)
    chosen = StudyRecord.of(ctx.study).baselines
    assert chosen["middle"] == (3,) and chosen["last"] == (7,) and chosen["spectrum"] == (2,)
    ran = [layer for layer, _ in fake.calls[4:]]
    assert 2 in ran and 3 not in ran and 7 not in ran  # only the missing picks were run
    roles = {TrialRecord.of(t).role for t in ctx.study.trials if t.number >= 4}
    assert "baseline:spectrum" in roles
    racing.measure_baselines(ctx)
    assert len(fake.calls) == 4 + len(ran)  # nothing left to measure


def test_off_means_no_baseline_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProxy(TRUTH, seed_sd=0.0)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx(baselines=False)
    first_pass(ctx, [3, 4])
    racing.measure_baselines(ctx)
    assert len(fake.calls) == 2


def test_a_finished_race_rerun_spends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = {**TRUTH, 7: 0.95}
    fake = FakeProxy(truth, seed_sd=0.005)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx()
    first_pass(ctx, list(range(8)))
    racing.race(ctx)
    runs = len(fake.calls)
    racing.race(ctx)  # a rerun of the same search command
    assert len(fake.calls) == runs


def test_contenders_per_round_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    flat = dict.fromkeys(range(8), 0.7)  # nothing separates: every layer stays tied
    fake = FakeProxy(flat, seed_sd=0.05)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx(seeds=3)
    ctx.config.search.contenders = 3
    first_pass(ctx, list(range(8)))
    analysis = study_record.study_analysis(ctx.study)
    assert analysis is not None and len(racing.next_repeats(ctx, analysis)) == 3  # the cap
    racing.race(ctx)
    repeated = [layer for layer, seeds in seeds_by_layer(ctx).items() if len(seeds) > 1]
    assert len(repeated) == 3 and len(fake.calls) <= 8 + 3 * 2  # contenders x (seeds - 1)


def test_popping_an_empty_queue_creates_no_trial() -> None:
    ctx = make_ctx()
    assert racing._pop(ctx.study) is None
    assert ctx.study.trials == []


class Failing(FakeProxy):
    def __call__(self, ctx: Any, trial: optuna.Trial) -> float:
        if suggest(trial, ctx.space).layers == (2,):  # type: ignore[union-attr]
            self.calls.append((2, -1))
            raise racing.TrialFailed("out of memory")
        return super().__call__(ctx, trial)


def test_a_baseline_that_keeps_failing_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Failing(TRUTH, seed_sd=0.0)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx(baselines=True)
    first_pass(ctx, [3, 4, 7])
    for _ in range(5):  # five reruns of the search command
        racing.measure_baselines(ctx)
    assert fake.calls.count((2, -1)) == 3  # storage.MAX_ATTEMPTS


def test_old_trials_without_a_seed_count_as_the_studys_proxy_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeProxy(TRUTH, seed_sd=0.01)
    monkeypatch.setattr(racing, "run_trial", fake)
    ctx = make_ctx()
    write_study(ctx.study, proxy_seed=5)
    ctx.config.proxy.seed = 5
    old = optuna.trial.create_trial(
        params={"layer": 7},
        distributions={"layer": optuna.distributions.IntDistribution(0, 7)},
        value=0.9,
        user_attrs=trial_fields(layers=[7], lr=1e-3, outcomes=outcomes(0.78)),
    )  # recorded before seeds were: no `seed` attr
    ctx.study.add_trial(old)
    first_pass(ctx, [6])
    racing.race(ctx)
    assert (7, 5) not in fake.calls  # seed 5 is what the old trial ran on
    assert 5 in seeds_by_layer(ctx)[7]
