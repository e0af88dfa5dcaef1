"""Tracking fails fast on an unreachable server, creates its store race-free, and is labelled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from autolayer.errors import AutolayerError
from autolayer.tracking import (
    KIND,
    KIND_TAG,
    PROBE_TIMEOUT,
    VIEW_TAG,
    MlflowTracker,
    NullTracker,
    denoised,
    probe_server,
    ui_address,
)


def test_an_unreachable_server_is_one_sentence_after_one_bounded_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In seconds means one /health request with PROBE_TIMEOUT, and MLflow's client (which
    retries for minutes) never made."""
    import urllib.request

    probes: list[tuple[str, float]] = []
    real = urllib.request.urlopen

    def probe(url: str, timeout: float) -> object:
        probes.append((url, timeout))
        return real(url, timeout=timeout)

    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("MLflow's client was made for an unreachable server")

    monkeypatch.setattr(urllib.request, "urlopen", probe)
    monkeypatch.setattr(mlflow, "MlflowClient", no_client)
    with pytest.raises(AutolayerError, match="http://127.0.0.1:9 is unreachable"):
        MlflowTracker("http://127.0.0.1:9", "x")
    assert probes == [("http://127.0.0.1:9/health", PROBE_TIMEOUT)] and PROBE_TIMEOUT <= 5
    with pytest.raises(AutolayerError, match="unreachable"):
        probe_server("http://127.0.0.1:9/")


def test_experiments_open_in_the_model_training_view(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    tags = mlflow.MlflowClient(uri).get_experiment(tracker.experiment_id).tags
    assert tags[KIND_TAG] == KIND
    assert MlflowTracker(uri, "exp", tmp_path).experiment_id == tracker.experiment_id


def test_four_processes_create_one_sqlite_store_at_once(tmp_path: Path) -> None:
    """Two workers on a fresh store used to die on 'duplicate column name' (no lock)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from pathlib import Path; from autolayer.tracking import MlflowTracker; "
        f"t = MlflowTracker({uri!r}, 'shared', Path({str(tmp_path)!r})); "
        "print(t.start_run('r'))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("shared").experiment_id]
    )
    assert len(runs) == 4  # one experiment, every worker's run in it


def test_a_tag_another_worker_set_at_the_same_instant_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers finishing a study both tag its parent run; in MLflow's SQL store both insert
    the tag row and the later one fails on the unique key (seen in CI). It is retried once."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    run_id = tracker.start_run("parent")
    real, calls = tracker.client.set_tag, []

    def racing(run: str, key: str, value: str) -> None:
        calls.append(key)
        if len(calls) == 1:  # the other worker's row went in first
            real(run, key, "other")
            raise MlflowException("UNIQUE constraint failed") from IntegrityError("", {}, None)
        real(run, key, value)

    monkeypatch.setattr(tracker.client, "set_tag", racing)
    tracker.set_tags(run_id, {"best_layers": "3"})
    assert calls == ["best_layers", "best_layers"]
    assert mlflow.MlflowClient(uri).get_run(run_id).data.tags["best_layers"] == "3"

    def broken(run: str, key: str, value: str) -> None:
        raise MlflowException("the run is not active")

    monkeypatch.setattr(tracker.client, "set_tag", broken)
    with pytest.raises(MlflowException, match="not active"):  # anything else is not retried
        tracker.set_tags(run_id, {"best_layers": "4"})


def test_the_printed_link_opens_the_runs_table_with_the_columns_that_matter(
    tmp_path: Path,
) -> None:
    """MLflow opens an experiment on its GenAI overview and nests trials, collapsed, under the
    study's run: the link names the model-training pages and a saved view of the table."""
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    e = tracker.experiment_id
    assert tracker.runs_url() == (
        f"http://127.0.0.1:5000/#/experiments/{e}/runs"
        "?viewStateShareKey=autolayer-trials&workflowType=machine_learning"
    )
    assert tracker.run_url("abc") == (
        f"http://127.0.0.1:5000/#/experiments/{e}/runs/abc?workflowType=machine_learning"
    )
    view = json.loads(mlflow.MlflowClient(uri).get_experiment(e).tags[VIEW_TAG])
    assert view["name"] == "autolayer: trials, best first"  # listed in the UI's Views menu
    state = json.loads(view["state"])
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`score`", False)  # flat
    assert state["selectedColumns"] == state["columnOrder"] == [
        "params.`layers`", "params.`lr`", "params.`seed`", "tags.`autolayer.role`",
        "tags.`trial_state`", "metrics.`contribution`", "metrics.`contribution_ci_low`",
        "metrics.`contribution_ci_high`", "metrics.`score`",
    ]  # fmt: skip
    assert ui_address("https://mlflow.example.org/") == "https://mlflow.example.org"
    assert ui_address("databricks") is None and NullTracker().runs_url() is None


def test_a_loss_within_float32_noise_is_logged_as_zero(tmp_path: Path) -> None:
    """A GRPO loss of 3.7e-9 is float32 rounding of 0: MLflow's chart labelled every tick of
    such a curve "0". Anything else is logged as it is."""
    assert denoised({"proxy/loss": -6.5e-9, "proxy/kl": 1e-9, "x/grad_norm": 1e-9}) == {
        "proxy/loss": 0.0,
        "proxy/kl": 0.0,
        "x/grad_norm": 1e-9,
    }
    assert denoised({"proxy/loss": 2e-6, "proxy/kl": 0.003}) == {
        "proxy/loss": 2e-6,
        "proxy/kl": 0.003,
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    run_id = tracker.start_run("trial")
    tracker.lightning_logger(run_id).log_metrics({"proxy/loss": 3.7e-9, "proxy/kl": 0.002}, 1)
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics == {
        "proxy/loss": 0.0,
        "proxy/kl": 0.002,
    }


@pytest.mark.slow
def test_the_printed_link_shows_the_trials_in_a_browser(tmp_path: Path) -> None:
    """The served page, in headless Chromium: the runs table, best first, with the columns."""
    from benchmarks.ui_screenshots import Browser, at, chromium, free_port, mlflow_ui

    if chromium() is None:
        pytest.skip("no chromium on PATH")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "exp", tmp_path)
    parent = tracker.start_run("study-exp")
    for number, layer, score, role in ((0, 3, 0.7, "search"), (1, 5, 0.9, "repeat")):
        run = tracker.start_run(f"trial-{number} layers={layer}", parent, {"autolayer.role": role})
        tracker.log_params(run, {"layers": [layer], "seed": number})
        tracker.log_metrics(run, {"score": score, "contribution": 2 * score - 1}, step=30)
        tracker.set_tags(run, {"trial_state": "COMPLETE"})
        tracker.end_run(run)
    runs_url = tracker.runs_url()
    assert runs_url is not None
    with Browser() as browser, mlflow_ui(uri, free_port(), tmp_path / "ui.log") as address:
        text = browser.open(at(runs_url, address), "trial-0 layers=3", "trial-1 layers=5")
    assert "Model training" in text and "Traces 0" not in text  # not the GenAI overview
    assert "autolayer: trials, best first" in text and "Sort: score" in text
    for column in ("layers", "seed", "autolayer.role", "trial_state", "contribution", "score"):
        assert column in text
    assert text.index("trial-1 layers=5") < text.index("trial-0 layers=3")  # best first
    assert "repeat" in text and "0.8" in text  # the repeat's role and C, in its row
