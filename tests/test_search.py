"""End-to-end searches on the bundled model, tiny settings (seconds per trial on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autolayer.config import config_from_dict
from autolayer.search import run_search
from autolayer.storage import load_study
from autolayer.study import StudyRecord, TrialRecord

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


def test_rerun_resumes_without_repeating_finished_trials(tmp_path: Path) -> None:
    space = write_space(tmp_path, layers=[2, 4])
    data = tiny_config(tmp_path, space, n_trials=1)
    data["tracking"] = {"enabled": False}
    root = tmp_path / "mlruns"
    first = run_search(config_from_dict(data), root=root).study
    assert len(first.trials) == 1
    data["search"]["n_trials"] = None
    study = run_search(config_from_dict(data), root=root).study
    layers = [TrialRecord.of(t).layers[0] for t in study.trials]
    assert sorted(layers) == [2, 3, 4]  # the rest of the space, each layer once
    again = run_search(config_from_dict(data), root=root).study
    assert len(again.trials) == 3  # nothing left to run


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


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "autolayer.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_mid_trial_then_rerun_loses_no_finished_trial(tmp_path: Path) -> None:
    space = write_space(tmp_path, layers=[2, 5])
    data = tiny_config(tmp_path, space)
    data["proxy"]["steps"] = 40  # a few seconds: the kill lands inside a trial
    data["tracking"] = {"enabled": False}
    config = _write_config(tmp_path, data)
    args = ("search", "--config", str(config), "--root", str(tmp_path / "mlruns"))
    worker = _cli(*args, cwd=tmp_path)
    deadline = time.time() + 240
    killed_number = None
    while time.time() < deadline and killed_number is None:
        time.sleep(0.5)
        try:
            study = load_study("tiny", None, tmp_path / "mlruns")
        except Exception:
            continue
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = study.get_trials(states=(TrialState.RUNNING,))
        if done and running and TrialRecord.of(running[0]).layers:
            os.kill(worker.pid, signal.SIGKILL)  # `layers` is set just before training starts
            killed_number = running[0].number
    worker.wait(timeout=30)
    assert killed_number is not None, "the search never reached a second trial"
    at_kill = load_study("tiny", None, tmp_path / "mlruns").trials[killed_number]
    assert at_kill.state == TrialState.RUNNING  # killed mid-trial, not between trials
    finished_before = {
        t.number: t.params
        for t in load_study("tiny", None, tmp_path / "mlruns").get_trials(
            states=(TrialState.COMPLETE,)
        )
    }

    rerun = _cli(*args, cwd=tmp_path)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
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
def test_two_workers_share_one_postgresql_study(tmp_path: Path, postgres_url: str) -> None:
    space = write_space(tmp_path, layers=[2, 5])
    data = tiny_config(tmp_path, space, storage=postgres_url)
    data["tracking"] = {"enabled": False}
    config = _write_config(tmp_path, data)
    root = str(tmp_path / "mlruns")
    workers = [
        _cli(
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
    outputs = [w.communicate(timeout=400)[0] for w in workers]
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
def test_bad_storage_is_one_sentence_and_exit_2(tmp_path: Path, bad: str) -> None:
    space = write_space(tmp_path, layers=[3, 3])
    data = tiny_config(tmp_path, space)
    config = _write_config(tmp_path, data)
    proc = _cli(
        "search",
        "--config",
        str(config),
        "--root",
        str(tmp_path / "mlruns"),
        "--storage",
        bad,
        cwd=tmp_path,
    )
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert output.strip().startswith("autolayer: error:")
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("pruner", ["wilcoxon", "hyperband"])
def test_pruners_run_on_real_trials(tmp_path: Path, pruner: str) -> None:
    space = write_space(tmp_path, layers=[2, 5])
    data = tiny_config(tmp_path, space, pruner=pruner)
    data["tracking"] = {"enabled": False}
    study = run_search(config_from_dict(data), root=tmp_path / "mlruns").study
    assert len(study.trials) == 4
    for trial in study.trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if trial.state == TrialState.PRUNED:
            assert TrialRecord.of(trial).prune_reason
        if pruner == "wilcoxon":  # paired blocks of the 64 eval prompts: 50 + 14
            assert sorted(trial.intermediate_values) == [0, 1]
        else:  # held-out score by rollout step (eval_every 2, 4 steps: only step 2 is reported)
            assert sorted(trial.intermediate_values) == [2]


def test_demo_command_prints_the_table_and_how_to_browse(tmp_path: Path) -> None:
    """`make demo` end to end: the bundled model, its task, the single-layer space."""
    proc = _cli("demo", "--root", str(tmp_path / "mlruns"), cwd=tmp_path)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "★ best" in output and "C at the proxy horizon of 30 steps" in " ".join(output.split())
    root = str(tmp_path / "mlruns")
    shown = _cli("results", "--study-name", "organism-organism-single_layer", "--root", root,
                 "--json", cwd=tmp_path)  # fmt: skip
    data = json.loads(shown.communicate(timeout=120)[0])
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
    assert "mlflow ui --backend-store-uri sqlite:///" in output
    assert "optuna-dashboard " in output and "optuna/journal.log" in output
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()


def test_tracking_leaves_the_environment_alone(tmp_path: Path) -> None:
    """Lightning's MLFlowLogger exports MLFLOW_TRACKING_URI; a search must not leak it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    space = write_space(tmp_path, layers=[4, 4])
    run_search(config_from_dict(tiny_config(tmp_path, space)), root=tmp_path / "mlruns")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
