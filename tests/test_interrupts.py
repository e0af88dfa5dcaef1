"""Ctrl-C and SIGTERM: one sentence, exit 128 + signal, the trial marked, and a rerun resumes.

Real signals to a real `autolayer search` subprocess; waits are on events (a trial reaching
RUNNING), with a generous cap only so a broken build cannot hang CI, and every child is reaped
by the `spawn` fixture. SIGINT takes the same handler as SIGTERM: its real-process run is opt-in
(slow), and `tests/test_cli.py` delivers both signals to the CLI in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from autolayer.cli import main
from autolayer.storage import MAX_ATTEMPTS, exhausted_candidates, load_study, retry_failed
from autolayer.study import TrialRecord, trial_fields
from tests.conftest import CAP, Spawn, wait_until


def _config(tmp_path: Path, steps: int) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "single_layer", "layers": [3, 4]}))
    data = {
        "task": {"eval_size": 32, "train_size": 64},
        "proxy": {"steps": steps, "prompts_per_step": 2, "num_generations": 2,
                  "eval_every": steps, "device": "cpu"},
        "search": {"space": str(space), "study_name": "sig", "pruner": "none", "seeds": 1,
                   "baselines": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _search(spawn: Spawn, config: Path, root: Path) -> subprocess.Popen[str]:
    return spawn(
        [sys.executable, "-m", "autolayer.cli", "search", "--config", str(config),
         "--root", str(root)],
        cwd=root.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _running_trial(root: Path) -> int | None:
    try:
        running = load_study("sig", None, root).get_trials(states=(TrialState.RUNNING,))
    except Exception:  # the study does not exist yet
        return None
    if running and TrialRecord.of(running[0]).mlflow_run_id:
        return running[0].number  # its MLflow run exists and its training has started
    return None


def _search_blocking(
    capsys: pytest.CaptureFixture[str], config: Path, root: Path, *extra: str
) -> str:
    """The searches before and after the signal run in-process: only the signalled one needs
    a process of its own."""
    code = main(["search", "--config", str(config), "--root", str(root), *extra])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)],
)
def test_a_signal_mid_trial_is_one_sentence_and_a_rerun_resumes(
    tmp_path: Path,
    signum: int,
    code: int,
    spawn: Spawn,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
) -> None:
    root = tmp_path / "mlruns"
    first = _config(tmp_path, steps=2)
    _search_blocking(capsys, first, root, "--n-trials", "1")  # references, layer 3
    proc = _search(spawn, _config(tmp_path, steps=100_000), root)  # layer 4 would never end
    number = wait_until(lambda: _running_trial(root), proc, "a trial training")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=CAP)
    name = signal.Signals(signum).name
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == (
        f"autolayer: interrupted by {name}; finished trials are saved; rerun the same command "
        "to resume"
    )
    assert "Traceback" not in err
    trial = load_study("sig", None, root).trials[number]
    assert trial.state == TrialState.FAIL
    assert TrialRecord.of(trial).fail_reason == f"interrupted by {name}"
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        TrialRecord.of(trial).mlflow_run_id
    )
    assert run.info.status == "KILLED" and run.data.tags["fail_reason"] == f"interrupted by {name}"

    out = _search_blocking(capsys, _config(tmp_path, steps=2), root)
    assert f"retrying 1 failed candidate(s), at most {MAX_ATTEMPTS} tries each: layers 4" in out
    study = load_study("sig", None, root)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["layer"] for t in complete) == [3, 4]  # resumed; nothing repeated


def test_resume_retries_failures_up_to_the_limit_and_never_a_finished_candidate() -> None:
    study = optuna.create_study(direction="maximize")
    dist = {"layer": optuna.distributions.IntDistribution(0, 7)}

    def add(layer: int, state: TrialState, reason: str = "") -> None:
        attrs = (
            trial_fields(layers=[layer], fail_reason=reason)
            if reason
            else trial_fields(layers=[layer])
        )
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(
            create_trial(params={"layer": layer}, distributions=dist, state=state,
                         value=value, user_attrs=attrs)
        )  # fmt: skip

    add(1, TrialState.COMPLETE)
    add(1, TrialState.FAIL, "out of memory")  # finished since: never again
    add(2, TrialState.FAIL, "interrupted by SIGINT")
    add(4, TrialState.PRUNED)
    add(4, TrialState.FAIL, "worker died")
    for _ in range(MAX_ATTEMPTS):
        add(3, TrialState.FAIL, "FloatingPointError: the loss became nan")
    retried = retry_failed(study)
    assert [t.params for t in retried] == [{"layer": 2}]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [TrialRecord.of(t).retry_of for t in waiting] == [2]
    assert exhausted_candidates(study) == {(("layer", 3),)}
    assert retry_failed(study) == []  # layer 2 is already waiting
    retry = study.ask()  # the enqueued retry runs first, with the failed candidate's params
    assert retry.suggest_int("layer", 0, 7) == 2


def test_a_killed_train_leaves_no_debris_and_a_rerun_keeps_frozen_layers_bit_identical(
    tmp_path: Path,
    spawn: Spawn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
) -> None:
    """SIGKILL mid-training (no handler can run), then train again: the killed run's temp
    directory is removed, its MLflow run ends KILLED, and every frozen tensor equals the base."""
    import torch
    from transformers import AutoModelForCausalLM

    from autolayer.organism import organism_path

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": {"eval_size": 16, "train_size": 64},
                "proxy": {"prompts_per_step": 2, "num_generations": 2, "device": "cpu"},
                "tracking": {"tracking_uri": tracking, "experiment": "t"},
            }
        )
    )
    out = tmp_path / "out"

    args = ["train", "--config", str(config), "--layers", "3", "--out", str(out), "--root",
            str(tmp_path / "mlruns")]  # fmt: skip
    proc = spawn(
        [sys.executable, "-m", "autolayer.cli", *args, "--steps", "100000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def trainer_started() -> list[Path] | None:
        return list(tmp_path.glob(".out.tmp-*/trainer")) or None

    wait_until(trainer_started, proc, "TRL's trainer starting")
    proc.kill()
    proc.communicate()
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()  # killed: debris, no output
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("t")
    killed = client.search_runs([experiment.experiment_id])[0]
    assert killed.info.status == "RUNNING"  # nothing could end it

    monkeypatch.chdir(tmp_path)
    code = main([*args, "--steps", "2"])  # the rerun needs no process of its own
    assert code == 0, capsys.readouterr().err
    assert not list(tmp_path.glob(".out.tmp-*"))  # the dead run's copy is gone
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    base = AutoModelForCausalLM.from_pretrained(organism_path()).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    moved = [n for n in base if not torch.equal(base[n], trained[n])]
    assert moved and all(n.startswith("model.layers.3.") for n in moved)
