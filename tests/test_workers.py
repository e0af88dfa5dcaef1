"""Several workers started at once on a fresh store: one warm start, each candidate once, no
crash creating the MLflow store. Real processes, a real journal file and a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autolayer.runner import WARM_START_CLAIM
from autolayer.storage import load_study, make_storage
from autolayer.study import StudyRecord, TrialRecord
from tests.conftest import CAP


def _config(tmp_path: Path, storage: str | None, name: str) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "single_layer", "layers": [2, 5]}))  # 2, 3, 4, 5
    data = {
        "task": {"eval_size": 32, "train_size": 64},
        "proxy": {"steps": 2, "prompts_per_step": 2, "num_generations": 2, "eval_every": 2,
                  "device": "cpu"},
        "search": {"space": str(space), "study_name": name, "pruner": "none",
                   "storage": storage, "seeds": 1, "baselines": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_workers(tmp_path: Path, storage: str | None, n: int, name: str) -> None:
    config = _config(tmp_path, storage, name)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "autolayer.cli", "search", "--config", str(config),
             "--root", str(tmp_path / "mlruns"), "--seed", str(seed)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for seed in range(n)
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=CAP)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0] * n, outputs


def _check_study(storage: str | None, root: Path, tracking: str, name: str) -> None:
    study = load_study(name, storage, root)
    complete = Counter(t.params["layer"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert complete == {2: 1, 3: 1, 4: 1, 5: 1}  # every candidate completed exactly once
    seeds = {TrialRecord.of(t).seed for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert seeds == {StudyRecord.of(study).proxy_seed}  # one training seed, whatever each --seed
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        assert TrialRecord.of(trial).duplicate_of is not None  # the only pruned: a worker's twin
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING))
    names = optuna.get_all_study_names(make_storage(storage, root))
    assert WARM_START_CLAIM.format(study=name) not in names  # held while enqueuing, then gone
    queued = [t.params["layer"] for t in study.trials if "fixed_params" in t.system_attrs]
    assert sorted(queued) == [3, 4]  # the warm start (the middle layers), enqueued once
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None  # the SQLite store was created once, without a crash
    trial_runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.trial_state = 'COMPLETE'"
    )
    assert len(trial_runs) == 4


@pytest.mark.parametrize(
    "workers", [2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda n: f"{n}-workers"
)
def test_workers_share_a_fresh_journal(tmp_path: Path, workers: int) -> None:
    _run_workers(tmp_path, None, workers, "crowd")
    _check_study(None, tmp_path / "mlruns", f"sqlite:///{tmp_path / 'mlflow.db'}", "crowd")


@pytest.mark.parametrize(
    "workers", [2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda n: f"{n}-workers"
)
def test_workers_share_a_fresh_postgresql_study(
    tmp_path: Path, postgres_url: str, workers: int
) -> None:
    name = f"crowd-{workers}"  # a new study in the shared server (its schema races are tested
    # in test_storage)
    _run_workers(tmp_path, postgres_url, workers, name)
    _check_study(postgres_url, tmp_path / "mlruns", f"sqlite:///{tmp_path / 'mlflow.db'}", name)
