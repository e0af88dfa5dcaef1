"""End-to-end searches on the bundled model, tiny settings (seconds per trial on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from autolayer.cli import main
from autolayer.config import ProxyConfig, config_from_dict
from autolayer.errors import AutolayerError, Interrupted, TrialInterrupted
from autolayer.loading import Workload
from autolayer.proxy import ProxyResult
from autolayer.runner import frozen_heap, open_study, optimize, run_search, trials_to_run
from autolayer.scoring import Evaluation, References
from autolayer.search import SearchContext, can_start_trial, steps_used
from autolayer.spaces import bind, load_space
from autolayer.storage import load_study, retry_failed
from autolayer.study import (
    CONTRIBUTION_OBJECTIVE,
    StudyRecord,
    TrialRecord,
    trial_fields,
    write_study,
)
from autolayer.tracking import MlflowTracker, NullTracker
from tests.conftest import CAP, Spawn, wait_until

TINY = {
    "task": {"eval_size": 64, "train_size": 256},
    "proxy": {
        "steps": 4,
        "prompts_per_step": 4,
        "num_generations": 4,
        "eval_every": 2,
        "lr": 3.0e-3,
        "full_lr": 1.0e-3,
        "device": "cpu",
    },
    "search": {"pruner": "none", "sampler": "auto", "seeds": 1, "baselines": False},
}


def write_space(tmp_path: Path, **fields: object) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"kind": "single_layer", **fields}))
    return str(path)


def tiny_config(tmp_path: Path, space: str, **search: object) -> dict:
    data = {k: dict(v) for k, v in TINY.items()}
    data["search"].update(space=space, study_name="tiny", **search)
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return data


def test_search_records_trials_in_optuna_and_mlflow(tmp_path: Path) -> None:
    space = write_space(tmp_path, layers=[3, 4])
    config = config_from_dict(tiny_config(tmp_path, space))
    ctx = run_search(config, root=tmp_path / "mlruns")
    trials = ctx.study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(TrialRecord.of(t).layers for t in trials) == [(3,), (4,)]
    for t in trials:
        assert 0.0 <= (TrialRecord.of(t).score or -1.0) <= 1.0
        outcomes = TrialRecord.of(t).outcomes
        assert outcomes is not None and len(outcomes) == 64  # paired: every trial, same prompts
    assert len(StudyRecord.of(ctx.study).full_outcomes or ()) == 64
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = StudyRecord.of(ctx.study).parent_run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 3  # the all-layers reference and two trials
    trial_run = client.get_run(TrialRecord.of(trials[0]).mlflow_run_id)
    assert trial_run.data.params["layers"] in ("[3]", "[4]")
    assert trial_run.data.tags["trial_state"] == "COMPLETE"
    assert "score" in trial_run.data.metrics
    history = client.get_metric_history(trial_run.info.run_id, "proxy/reward_mean")
    assert len(history) == 4  # one point per proxy step, through Lightning's MLFlowLogger
    plots = tmp_path / "mlruns" / "studies" / "tiny"
    assert (plots / "contribution.png").stat().st_size > 0
    assert (plots / "history.png").stat().st_size > 0
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"config.yaml", "contribution.png", "history.png"} <= artifacts


def test_a_failing_trial_does_not_stop_the_study(tmp_path: Path) -> None:
    # lr 1e30 blows the weights up: the loss (or sampling) hits inf/NaN and the trial fails.
    space = write_space(tmp_path, layers=[3, 4], lr=[3.0e-3, 1.0e30])
    data = tiny_config(tmp_path, space)
    data["tracking"] = {"enabled": False}
    study = run_search(config_from_dict(data), root=tmp_path / "mlruns").study
    states = {(t.params["layer"], t.params["lr"]): t for t in study.trials}
    assert len(states) == 4
    for (_layer, lr), trial in states.items():
        if lr > 1:
            assert trial.state == TrialState.FAIL
            assert TrialRecord.of(trial).fail_reason
        else:
            assert trial.state == TrialState.COMPLETE


def _cli(spawn: Spawn, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return spawn(
        [sys.executable, "-m", "autolayer.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_mid_trial_then_rerun_loses_no_finished_trial(
    tmp_path: Path, spawn: Spawn, capsys: pytest.CaptureFixture[str], main_in_process: None
) -> None:
    space = write_space(tmp_path, layers=[2, 5])
    data = tiny_config(tmp_path, space)
    data["proxy"]["steps"] = 40  # a few seconds: the kill lands inside a trial
    data["tracking"] = {"enabled": False}
    config = _write_config(tmp_path, data)
    args = ("search", "--config", str(config), "--root", str(tmp_path / "mlruns"))
    worker = _cli(spawn, *args, cwd=tmp_path)

    def second_trial_training() -> int | None:
        try:
            study = load_study("tiny", None, tmp_path / "mlruns")
        except Exception:  # the study does not exist yet
            return None
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = study.get_trials(states=(TrialState.RUNNING,))
        if done and running and TrialRecord.of(running[0]).layers:
            return running[0].number  # `layers` is set just before training starts
        return None

    killed_number = wait_until(second_trial_training, worker, "a second trial training")
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()
    at_kill = load_study("tiny", None, tmp_path / "mlruns").trials[killed_number]
    assert at_kill.state == TrialState.RUNNING  # killed mid-trial, not between trials
    finished_before = {
        t.number: t.params
        for t in load_study("tiny", None, tmp_path / "mlruns").get_trials(
            states=(TrialState.COMPLETE,)
        )
    }

    code = main(list(args))  # the rerun needs no process of its own
    output, err = capsys.readouterr()
    assert code == 0, output + err
    study = load_study("tiny", None, tmp_path / "mlruns")
    killed = study.trials[killed_number]
    assert killed.state == TrialState.FAIL
    assert "worker died" in (TrialRecord.of(killed).fail_reason or "")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for number, params in finished_before.items():  # finished trials survive untouched
        assert study.trials[number].state == TrialState.COMPLETE
        assert study.trials[number].params == params
    layers = sorted(t.params["layer"] for t in complete)
    assert layers == [2, 3, 4, 5]  # every layer exactly once: none lost, none repeated


@pytest.mark.slow  # test_workers runs the same two PostgreSQL workers, with more checks
def test_two_workers_share_one_postgresql_study(
    tmp_path: Path, postgres_url: str, spawn: Spawn
) -> None:
    space = write_space(tmp_path, layers=[2, 5])
    data = tiny_config(tmp_path, space, storage=postgres_url)
    data["tracking"] = {"enabled": False}
    config = _write_config(tmp_path, data)
    root = str(tmp_path / "mlruns")
    workers = [
        _cli(
            spawn,
            "search",
            "--config",
            str(config),
            "--root",
            root,
            "--n-trials",
            "2",
            "--seed",
            str(seed),
            cwd=tmp_path,
        )
        for seed in (0, 1)
    ]
    outputs = [w.communicate(timeout=CAP)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(
        study_name="tiny", storage=load_study("tiny", postgres_url, Path(root))._storage
    )
    assert len(study.trials) == 4  # every trial counted once
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    for t in study.trials:  # none lost; a twin drawn at the same instant is pruned as such
        assert t.state == TrialState.COMPLETE or TrialRecord.of(t).duplicate_of is not None
    workers_seen = {TrialRecord.of(t).worker_pid for t in study.trials}
    assert len(workers_seen) == 2  # both workers ran trials


@pytest.mark.parametrize("bad", ["postgresql://nobody@127.0.0.1:1/none", "foo://bar"])
def test_bad_storage_is_one_sentence_and_exit_2(tmp_path: Path, bad: str, spawn: Spawn) -> None:
    space = write_space(tmp_path, layers=[3, 3])
    data = tiny_config(tmp_path, space)
    config = _write_config(tmp_path, data)
    proc = _cli(
        spawn,
        "search",
        "--config",
        str(config),
        "--root",
        str(tmp_path / "mlruns"),
        "--storage",
        bad,
        cwd=tmp_path,
    )
    output, _ = proc.communicate(timeout=CAP)
    assert proc.returncode == 2
    assert output.strip().startswith("autolayer: error:")
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1


def test_demo_command_prints_the_table_and_how_to_browse(tmp_path: Path, spawn: Spawn) -> None:
    """`make demo` end to end: the bundled model, its task, the single-layer space."""
    proc = _cli(spawn, "demo", "--root", str(tmp_path / "mlruns"), cwd=tmp_path)
    output, _ = proc.communicate(timeout=CAP)
    assert proc.returncode == 0, output
    assert "★ best" in output and "C at the proxy horizon of 30 steps" in " ".join(output.split())
    root = str(tmp_path / "mlruns")
    shown = _cli(spawn, "results", "--study-name", "organism-organism-single_layer", "--root", root,
                 "--json", cwd=tmp_path)  # fmt: skip
    data = json.loads(shown.communicate(timeout=CAP)[0])
    candidates = {tuple(c["layers"]): c for c in data["candidates"]}
    table = [line for line in output.splitlines() if line.startswith("│")]
    assert len(table) == len(candidates)  # one row per measured layer, over its seeds
    best = data["candidates"][0]
    assert best["verdict"] == "best" and best["seeds"] >= 2  # racing repeated the contenders
    assert "training-seed term" in data["method"]
    assert set(data["baselines"]) == {"middle", "last", "spectrum", "random"}
    for name, layers in data["baselines"].items():
        assert name in candidates[tuple(layers)]["baselines"]  # every heuristic measured
    seeds = [(tuple(t["layers"]), t["seed"]) for t in data["trials"] if t["state"] == "COMPLETE"]
    assert len(seeds) == len(set(seeds))  # no (layers, seed) run twice
    assert "mlflow ui --backend-store-uri sqlite:///" in output and "--port 5000" in output
    link = "then open http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey="
    assert link in " ".join(output.split())  # the runs table, not the GenAI overview
    assert "optuna-dashboard " in output and "optuna/journal.log" in output
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    study = load_study("organism-organism-single_layer", None, tmp_path / "mlruns")
    assert optuna.get_all_study_names(study._storage) == [study.study_name]  # no claim markers
    assert data["pick"]["layers"] == best["layers"] == list(TrialRecord.of(study.best_trial).layers)


def test_tracking_leaves_the_environment_alone(tmp_path: Path) -> None:
    """Lightning's MLFlowLogger exports MLFLOW_TRACKING_URI; a search must not leak it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    space = write_space(tmp_path, layers=[4, 4])
    run_search(config_from_dict(tiny_config(tmp_path, space)), root=tmp_path / "mlruns")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


# --- The search's logic as a specification: a fake proxy run, no training --------------------

N = 100  # held-out prompts of the fake runs
BASE, FULL = 0.2, 0.8  # the references: C = (score - 0.2) / 0.6


def held_out(p: float) -> Evaluation:
    k = round(p * N)
    return Evaluation.from_outcomes([1.0] * k + [0.0] * (N - k))


class FakeProxy:
    """Stands in for `run_proxy`: layer l's held-out score at step s is `curves[l](s)`; it calls
    the eval hook at every `eval_every` step, as the real run does, and stops when told to."""

    def __init__(
        self, curves: dict[int, Callable[[int], float]], fail: tuple[int, ...] = (),
        seeds: dict[tuple[int, int], float] | None = None,
    ):  # fmt: skip
        self.curves, self.fail = curves, fail
        self.seeds = seeds or {}  # (layer, training seed) -> its held-out score, flat
        self.runs: list[tuple[int, ...]] = []

    def __call__(
        self, work: Any, config: ProxyConfig, layers: Any, lr: float | None = None, *,
        keep: bool = True, eval_hook: Any = None, logger: Any = None, progress: bool = False,
        states: Any = None,
    ) -> ProxyResult:  # fmt: skip
        assert keep is False  # trials share one model: each must put its layers back
        chosen = tuple(sorted(layers))
        self.runs.append(chosen)
        if chosen[0] in self.fail:
            raise FloatingPointError("the loss became nan")
        evals = []
        seeded = self.seeds.get((chosen[0], config.seed))
        curve = self.curves[chosen[0]] if seeded is None else flat(seeded)
        for step in range(config.eval_every, config.steps + 1, config.eval_every):
            final = held_out(curve(step))
            evals.append((step, final.score))
            if eval_hook is not None and eval_hook(step, final):
                return ProxyResult(chosen, lr or config.lr, final, step, 0.0, evals, [], True)
        return ProxyResult(chosen, lr or config.lr, final, config.steps, 0.0, evals)


def flat(p: float) -> Callable[[int], float]:
    return lambda step: p


def fake_search(
    tmp_path: Path, proxy: FakeProxy, bounds: tuple[int, int], first: list[int] | None = None,
    **search: Any,
) -> SearchContext:  # fmt: skip
    """A real study (journal storage under tmp_path) and the real trial loop around `proxy`,
    over the single layers `bounds` (inclusive), trying the layers `first` first."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = {
        "proxy": {"steps": 30, "eval_every": 10, "device": "cpu"},
        "search": {"space": write_space(tmp_path, layers=list(bounds)),
                   "study_name": "spec", "pruner": "none", "seeds": 1, "baselines": False,
                   **search},
        "tracking": {"enabled": False},
    }  # fmt: skip
    config = config_from_dict(data)
    space = bind(load_space(config.search.space), 8)
    study = open_study(config, space, root=tmp_path)
    write_study(
        study,
        reference_base_outcomes=list(held_out(BASE).outcomes),
        reference_full_outcomes=list(held_out(FULL).outcomes),
        objective=CONTRIBUTION_OBJECTIVE,
        objective_origin=0.0,
    )
    task = SimpleNamespace(name="fake")
    ctx = SearchContext(
        config, Workload(None, None, task), space, study, NullTracker(), "",  # type: ignore[arg-type]
        References(held_out(BASE), held_out(FULL)), proxy_run=proxy,
    )  # fmt: skip
    for layer in first or []:
        study.enqueue_trial({"layer": layer})
    return ctx


def by_layer(study: optuna.Study) -> dict[int, FrozenTrial]:
    return {TrialRecord.of(t).layers[0]: t for t in study.trials if TrialRecord.of(t).layers}


def test_the_objective_is_c_and_the_record_holds_its_interval(tmp_path: Path) -> None:
    ctx = fake_search(tmp_path, FakeProxy({3: flat(0.5)}), (3, 3))
    optimize(ctx)
    (trial,) = ctx.study.trials
    record = TrialRecord.of(trial)
    assert trial.value == pytest.approx((0.5 - BASE) / (FULL - BASE))  # 0.5 by hand
    assert record.contribution == pytest.approx(0.5)
    assert record.ci_low is not None and record.ci_high is not None
    assert record.ci_low < 0.5 < record.ci_high
    assert (record.score, record.steps, len(record.outcomes or ())) == (0.5, 30, N)


def test_the_step_budget_stops_the_search_before_a_run_that_would_overspend(
    tmp_path: Path,
) -> None:
    proxy = FakeProxy({layer: flat(0.5) for layer in range(8)})
    ctx = fake_search(tmp_path, proxy, (0, 7), max_total_steps=75)  # room for two 30-step runs
    optimize(ctx)
    assert len(proxy.runs) == 2 and steps_used(ctx.study) == 60
    spent = [t for t in ctx.study.trials if TrialRecord.of(t).budget_spent]
    assert len(spent) == 1 and spent[0].state == TrialState.PRUNED
    assert TrialRecord.of(spent[0]).prune_reason == "not run: the budget of 75 proxy steps is spent"
    assert len(ctx.study.trials) == 3  # the study stopped there, eight candidates or not
    assert not can_start_trial(ctx)


def test_the_median_pruner_stops_a_layer_under_the_median_where_it_stands(tmp_path: Path) -> None:
    proxy = FakeProxy({1: flat(0.7), 2: flat(0.68), 0: flat(0.35)})
    ctx = fake_search(tmp_path, proxy, (0, 2), first=[1, 2, 0], pruner="median")
    optimize(ctx)
    trials = by_layer(ctx.study)
    assert trials[0].state == TrialState.PRUNED
    assert TrialRecord.of(trials[0]).steps == 10  # stopped at its first report
    assert TrialRecord.of(trials[0]).prune_reason == (
        "step 10: score 0.350 under the median pruner's bar"
    )
    assert steps_used(ctx.study) == 30 + 30 + 10


def test_the_interval_pruner_keeps_a_slow_starter_and_stops_a_flat_laggard(
    tmp_path: Path,
) -> None:
    """Layer 0 starts at C 0.25 and ends best; layer 3 stays at C 0.25. At step 10 they look
    alike, the median pruner drops both, and only their slopes tell them apart."""
    slow = {10: 0.35, 20: 0.6, 30: 0.78}
    curves = {1: flat(0.7), 2: flat(0.68), 0: slow.__getitem__, 3: flat(0.35)}
    interval = fake_search(tmp_path / "interval", FakeProxy(curves), (0, 3), first=[1, 2, 0, 3],
                           pruner="interval")  # fmt: skip
    optimize(interval)
    trials = by_layer(interval.study)
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == pytest.approx(
        (0.78 - BASE) / (FULL - BASE)
    )
    assert trials[3].state == TrialState.PRUNED and TrialRecord.of(trials[3]).steps == 20
    median = fake_search(tmp_path / "median", FakeProxy(curves), (0, 3), first=[1, 2, 0, 3],
                         pruner="median")  # fmt: skip
    optimize(median)
    pruned = {layer for layer, t in by_layer(median.study).items() if t.state == TrialState.PRUNED}
    assert pruned == {0, 3}


def track(ctx: SearchContext, tmp_path: Path) -> mlflow.MlflowClient:
    """Give a fake search a real MLflow store (SQLite) and its study run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx.tracker = MlflowTracker(uri, "spec", tmp_path)
    ctx.parent_run = ctx.tracker.start_run("study-spec")
    write_study(ctx.study, mlflow_runs=ctx.tracker.runs_url() or "", mlflow_tracking_uri=uri)
    return mlflow.MlflowClient(uri)


def test_a_pruned_trial_finishes_in_mlflow_with_where_it_stood(tmp_path: Path) -> None:
    """Not KILLED with no metric (drawn as a failure, dropped from comparisons): FINISHED,
    tagged PRUNED, with the score and C Optuna keeps for it."""
    proxy = FakeProxy({1: flat(0.7), 2: flat(0.68), 0: flat(0.35)})
    ctx = fake_search(tmp_path, proxy, (0, 2), first=[1, 2, 0], pruner="median")
    client = track(ctx, tmp_path)
    optimize(ctx)
    pruned = by_layer(ctx.study)[0]
    assert pruned.state == TrialState.PRUNED
    run_id = TrialRecord.of(pruned).mlflow_run_id
    assert run_id is not None and run_id in (TrialRecord.of(pruned).mlflow_run or "")  # a link
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "PRUNED"
    assert run.data.metrics["score"] == 0.35  # stopped at step 10
    assert run.data.metrics["contribution"] == pytest.approx(pruned.value) == 0.25  # by hand


def _raced(tmp_path: Path) -> tuple[SearchContext, mlflow.MlflowClient]:
    """Layers 6 and 7 searched, raced over two seeds and finished, tracked in MLflow."""
    from autolayer import racing
    from autolayer.runner import finish_study
    from autolayer.storage import study_proxy_seed

    scores = {(7, 0): 0.74, (7, 1): 0.78, (6, 0): 0.75, (6, 1): 0.71}
    ctx = fake_search(tmp_path, FakeProxy({}, seeds=scores), (6, 7), seeds=2)
    client = track(ctx, tmp_path)
    study_proxy_seed(ctx.study, ctx.study._storage, 0)  # claims it, as each worker does
    optimize(ctx)
    racing.race(ctx)
    finish_study(ctx, tmp_path, seconds=1.0)
    return ctx, client


def test_the_answer_is_the_same_in_the_table_optuna_mlflow_and_the_dashboard(
    tmp_path: Path,
) -> None:
    """Layer 7 scores 0.74 and 0.78 on seeds 0 and 1 (0.76 over both), layer 6 0.75 and 0.71
    (0.73): the pick is 7 at C (0.76 - 0.2) / 0.6 = 0.933. Its repeat's own C, 0.967, used to be
    Optuna's best value; the repeat now reports its layer's 0.933, as the table does."""
    from optuna_dashboard import get_note

    from autolayer.report import candidate_rows

    ctx, client = _raced(tmp_path)
    rows, _ = candidate_rows(ctx.study)
    assert (rows[0].layers, rows[0].seeds, rows[0].verdict) == ((7,), 2, "best")  # the table
    assert rows[0].contribution == pytest.approx(0.56 / 0.6)
    best = ctx.study.best_trial  # optuna-dashboard's "Best Trial"
    assert TrialRecord.of(best).layers == (7,) and TrialRecord.of(best).role == "repeat"
    assert best.value == pytest.approx(0.56 / 0.6) and TrialRecord.of(best).contribution == (
        pytest.approx(0.58 / 0.6)
    )  # the repeat's own run keeps its own C
    pick = StudyRecord.of(ctx.study).pick
    sevens = [t.number for t in ctx.study.trials if TrialRecord.of(t).layers == (7,)]
    assert pick is not None and (pick["layers"], pick["trials"]) == ([7], sevens)
    assert pick["contribution"] == pytest.approx(0.56 / 0.6, abs=1e-4)
    study_run = client.get_run(ctx.parent_run).data
    assert study_run.metrics["search/best"] == pick["contribution"]
    assert study_run.tags["best_layers"] == "7"
    assert study_run.tags["mlflow.note.content"].startswith("The answer: **layers 7**")
    assert get_note(ctx.study).startswith("## The answer\n**layers 7** (lr 0.001): C 0.933")


def test_a_queued_repeat_runs_to_the_end_whatever_the_pruner_says(tmp_path: Path) -> None:
    proxy = FakeProxy({1: flat(0.7), 2: flat(0.68), 0: flat(0.35)})
    ctx = fake_search(tmp_path, proxy, (0, 2), first=[1, 2], pruner="median")
    ctx.study.enqueue_trial({"layer": 0}, user_attrs=trial_fields(role="repeat", seed=7))
    optimize(ctx)
    repeat = by_layer(ctx.study)[0]
    assert repeat.state == TrialState.COMPLETE and TrialRecord.of(repeat).seed == 7


@pytest.mark.parametrize("pruner", ["wilcoxon", "hyperband"])
def test_each_pruner_gets_the_reports_it_reads(tmp_path: Path, pruner: str) -> None:
    proxy = FakeProxy({2: flat(0.7), 3: flat(0.4)})
    ctx = fake_search(tmp_path, proxy, (2, 3), first=[2, 3], pruner=pruner)
    optimize(ctx)
    first, second = ctx.study.trials  # two blocks or one bracket: too little to prune on
    assert first.state == second.state == TrialState.COMPLETE
    if pruner == "wilcoxon":  # paired blocks of the 100 held-out prompts, 50 + 50, after the run
        assert sorted(first.intermediate_values) == sorted(second.intermediate_values) == [0, 1]
        # layer 3 passes its first 40 prompts: block 0 scores 40/50, block 1 none of its 50
        assert second.intermediate_values[0] == pytest.approx((0.8 - BASE) / (FULL - BASE))
        assert second.intermediate_values[1] == pytest.approx((0.0 - BASE) / (FULL - BASE))
    else:  # held-out C by step, every eval_every steps before the last
        assert sorted(first.intermediate_values) == sorted(second.intermediate_values) == [10, 20]
        assert first.intermediate_values[10] == pytest.approx((0.7 - BASE) / (FULL - BASE))


def test_a_rerun_resumes_and_never_repeats_a_finished_candidate(tmp_path: Path) -> None:
    curves = {layer: flat(0.5) for layer in range(8)}
    first = FakeProxy(curves)
    optimize(fake_search(tmp_path, first, (2, 4), n_trials=1))
    rest = FakeProxy(curves)
    ctx = fake_search(tmp_path, rest, (2, 4))  # the same study, opened again
    optimize(ctx)
    assert sorted(first.runs + rest.runs) == [(2,), (3,), (4,)]  # each layer once
    again = FakeProxy(curves)
    done = fake_search(tmp_path, again, (2, 4))
    assert trials_to_run(done) == 0
    optimize(done)
    assert again.runs == [] and len(done.study.trials) == 3


def test_a_failing_trial_keeps_its_reason_and_the_study_goes_on(tmp_path: Path) -> None:
    proxy = FakeProxy({2: flat(0.5), 4: flat(0.6)}, fail=(3,))
    ctx = fake_search(tmp_path, proxy, (2, 4))
    optimize(ctx)
    trials = by_layer(ctx.study)
    assert trials[3].state == TrialState.FAIL
    assert TrialRecord.of(trials[3]).fail_reason == "FloatingPointError: the loss became nan"
    assert trials[2].state == trials[4].state == TrialState.COMPLETE


def test_an_interrupt_mid_trial_marks_it_and_the_rerun_retries_only_it(tmp_path: Path) -> None:
    class Interrupting(FakeProxy):
        def __call__(self, *args: Any, **kwargs: Any) -> ProxyResult:
            if len(self.runs) == 1:  # the second run: Ctrl-C arrives while it trains
                self.runs.append(tuple(args[2]))
                raise Interrupted(signal.SIGINT)
            return super().__call__(*args, **kwargs)

    curves = {layer: flat(0.5) for layer in range(8)}
    ctx = fake_search(tmp_path, Interrupting(curves), (2, 4), first=[2, 3, 4])
    with pytest.raises(TrialInterrupted):
        optimize(ctx)
    trials = by_layer(ctx.study)
    assert trials[2].state == TrialState.COMPLETE and 4 not in trials
    assert trials[3].state == TrialState.FAIL
    assert TrialRecord.of(trials[3]).fail_reason == "interrupted by SIGINT"
    rerun = FakeProxy(curves)
    resumed = fake_search(tmp_path, rerun, (2, 4))
    assert [TrialRecord.of(t).layers for t in retry_failed(resumed.study)] == [(3,)]
    optimize(resumed)
    assert sorted(rerun.runs) == [(3,), (4,)]  # the interrupted layer again, then the rest


def test_the_search_freezes_the_loaded_heap_and_lets_it_go() -> None:
    """A search freezes what is loaded (collections after each trial skip it) and unfreezes on
    the way out; under a caller that froze its own heap (this test session) it changes nothing."""
    import gc

    session = gc.get_freeze_count()
    assert session > 0  # tests/conftest.py froze the imports
    with frozen_heap():
        assert gc.get_freeze_count() == session
    assert gc.get_freeze_count() == session
    gc.unfreeze()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
    finally:
        gc.freeze()


class SeedShiftProxy(FakeProxy):
    """Layer l scores `curves[l]` on even training seeds and 0.2 less on odd ones: seed noise
    four times the prompt noise of 100 prompts."""

    def __call__(self, work: Any, config: ProxyConfig, *args: Any, **kwargs: Any) -> ProxyResult:
        shift = -0.2 if config.seed % 2 else 0.0
        curves = self.curves
        self.curves = {layer: flat(curve(0) + shift) for layer, curve in curves.items()}
        try:
            return super().__call__(work, config, *args, **kwargs)
        finally:
            self.curves = curves


def test_trials_and_the_export_carry_the_tables_interval(tmp_path: Path) -> None:
    from autolayer.racing import race
    from autolayer.report import candidate_rows, verdict_lines
    from autolayer.study import study_evidence

    proxy = SeedShiftProxy({2: flat(0.6), 3: flat(0.62), 4: flat(0.3)})
    ctx = fake_search(tmp_path, proxy, (2, 4), first=[2, 3, 4], seeds=2)
    optimize(ctx)
    race(ctx)
    trials = [TrialRecord.of(t) for t in ctx.study.trials]
    searched, repeats = trials[:3], trials[3:]
    assert [(r.layers, r.seed) for r in repeats] == [((3,), 1), ((2,), 1), ((4,), 1)]
    assert all(r.ci_seed_df == 0 for r in searched)  # finished before any repeat
    assert [r.ci_seed_df for r in repeats] == [1, 2, 3]  # each repeat adds its own seed pair
    second = repeats[1]  # layer 2, seed 1: 0.4, C 1/3; the seed term widens it past prompt noise
    assert second.contribution == pytest.approx(1 / 3)
    assert second.ci_low is not None and second.ci_high is not None
    assert second.ci_high - second.ci_low > 1.0  # prompt noise alone gives it about 0.3
    rows, analysis = candidate_rows(ctx.study)
    assert analysis is not None and analysis.seed_df == 3
    evidence, _ = study_evidence(ctx.study, (3,), "journal:x")
    (entry,) = evidence["trials"]
    (row,) = [r for r in rows if r.layers == (3,)]
    assert (entry["seeds"], entry["ci_low"], entry["ci_high"]) == (2, row.ci_low, row.ci_high)
    assert evidence["seed_noise_included"] is True
    assert not any("prompt noise only" in line for line in verdict_lines(ctx.study))


def test_intervals_without_a_seed_term_say_so_where_they_are_shown(tmp_path: Path) -> None:
    from rich.console import Console

    from autolayer.report import candidates_table, results_json, results_table, verdict_lines
    from autolayer.study import study_evidence

    ctx = fake_search(tmp_path, FakeProxy({2: flat(0.6), 3: flat(0.5)}), (2, 3), seeds=1)
    optimize(ctx)
    console = Console(width=200, record=True)
    console.print(candidates_table(ctx.study))
    console.print(results_table(ctx.study))
    text = " ".join(console.export_text().split())
    assert "C [95% CI*]" in text and "* intervals cover prompt noise only" in text
    assert "0.67 [" in text and "] *" in text  # each trial's interval is marked too
    assert any("note: intervals cover prompt noise only" in x for x in verdict_lines(ctx.study))
    assert results_json(ctx.study)["seed_noise_included"] is False
    assert study_evidence(ctx.study, (2,), "journal:x")[0]["seed_noise_included"] is False


def test_a_study_with_no_usable_score_is_refused(tmp_path: Path) -> None:
    from autolayer.runner import require_a_score

    ctx = fake_search(tmp_path, FakeProxy({}, fail=(2, 3)), (2, 3))
    optimize(ctx)
    with pytest.raises(AutolayerError) as err:
        require_a_score(ctx.study)
    assert str(err.value).startswith(
        "no trial of study 'spec' produced a usable score (2 fail: FloatingPointError: the loss "
        "became nan); nothing is ranked"
    )


@pytest.mark.parametrize(
    ("full_lr", "space_lr", "message"),
    [
        (1.0e30, None, "the all-layers reference run failed ("),
        (1.0e-3, [1.0e30, 2.0e30], "no trial of study 'tiny' produced a usable score (1 fail: "),
    ],
    ids=["diverging reference", "every trial diverges"],
)
def test_a_search_that_cannot_score_is_one_sentence_and_closes_its_parent_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
    full_lr: float,
    space_lr: list[float] | None,
    message: str,
) -> None:
    """lr 1e30 blows the weights up: the reference run, or every trial, ends in NaN."""
    space = write_space(tmp_path, layers=[3, 3], **({"lr": space_lr} if space_lr else {}))
    data = tiny_config(tmp_path, space, n_trials=1)
    data["proxy"]["full_lr"] = full_lr
    config = _write_config(tmp_path, data)
    code = main(["search", "--config", str(config), "--root", str(tmp_path / "mlruns")])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.startswith(f"autolayer: error: {message}") and len(err.splitlines()) == 1
    client = mlflow.MlflowClient(data["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name("tiny").experiment_id
    [parent] = client.search_runs([experiment], "tags.`optuna.study` = 'tiny'")
    assert parent.info.status == "FAILED"


def test_a_parent_run_made_by_a_killed_worker_is_adopted_not_doubled(tmp_path: Path) -> None:
    """MLflow names a run only once it exists: a worker killed between making the study's parent
    run and recording it left a RUNNING orphan, and the rerun made a second parent."""
    from autolayer.runner import _parent_run
    from autolayer.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    orphan = tracker.start_run("study-spec", tags={"optuna.study": "spec"})  # then the kill
    tracker.start_run("study-other", tags={"optuna.study": "other"})
    tracker.start_run("trial-0", orphan, {"optuna.study": "spec"})  # a child is never adopted
    config = config_from_dict({"tracking": {"tracking_uri": uri}})
    study = optuna.create_study(study_name="spec")
    assert _parent_run(config, study, tracker, "t") == orphan
    assert StudyRecord.of(study).parent_run_id == orphan
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`optuna.study` = 'spec'")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert "config.yaml" in {a.path for a in client.list_artifacts(orphan)}
    assert _parent_run(config, study, tracker, "t") == orphan  # and found again by its record


def test_opening_a_study_prints_no_optuna_banner(tmp_path: Path) -> None:
    import logging

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, verbosity = Collect(), optuna.logging.get_verbosity()
    logging.getLogger("optuna").addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default
    try:
        fake_search(tmp_path, FakeProxy({}), (2, 3))
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # put back after
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.set_verbosity(verbosity)
    assert not [m for m in seen if "A new study created" in m]


@pytest.mark.slow
def test_optuna_dashboard_shows_one_study_and_its_answer(tmp_path: Path) -> None:
    """The served pages, in headless Chromium: no claim marker listed as a study, the best
    trial a run of the pick, the answer on the Note page."""
    from benchmarks.ui_screenshots import Browser, chromium, dashboard, free_port

    if chromium() is None:
        pytest.skip("no chromium on PATH")
    ctx, _ = _raced(tmp_path)
    pick = StudyRecord.of(ctx.study).pick
    assert pick is not None
    journal = str(tmp_path / "optuna" / "journal.log")
    with Browser() as browser, dashboard(journal, free_port(), tmp_path / "d.log") as address:
        studies = browser.open(f"{address}/dashboard", "spec")
        study = browser.open(f"{address}/dashboard/studies/0", "Best Trial")
        note = browser.open(f"{address}/dashboard/studies/0/note", "The answer")
    assert "claimed" not in studies and studies.count("spec") == 1
    assert f"Best Trial (number={ctx.study.best_trial.number})" in study
    assert ctx.study.best_trial.number in pick["trials"]
    assert "layers 7 (lr 0.001): C 0.933" in note and "the study's runs" in note
