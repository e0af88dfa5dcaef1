"""MLflow tracking: a parent run per study, a nested run per trial. Only module importing mlflow.

The embedded default is SQLite under `mlruns/` with artifacts beside it (MLflow >= 3.13 refuses the
old `./mlruns` file store). `--tracking-uri` or `MLFLOW_TRACKING_URI` selects a server instead.
Everything goes through an explicit `MlflowClient`, never the fluent global run, so several trials
and worker processes can log at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from autolayer.errors import AutolayerError
from autolayer.processes import died_here

DEFAULT_ROOT = Path("mlruns")  # the local store of both the Optuna study and MLflow
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests runs that carry it
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the model-training view
HOST_TAG, PID_TAG = "autolayer.host", "autolayer.pid"
PROBE_TIMEOUT = 5.0  # seconds to wait for a tracking server before calling it unreachable
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
VIEW_KEY = "autolayer-trials"  # the runs table the search prints a link to (`runs_view`)
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY  # MLflow's tag for a saved view of the table
ML_PAGES = "workflowType=machine_learning"  # MLflow 3 opens its GenAI pages unless told
# A GRPO loss is a mean of advantage-weighted ratios of order 1, zero while the policy is the
# sampling one, and its KL zero while the policy is the reference: float32 resolves nothing below
# its epsilon there, and MLflow's charts label every tick of such noise "0".
FLOAT_NOISE = 1.2e-7  # float32 epsilon, 2**-23
NOISY_METRICS = ("loss", "/kl")  # metric keys ending so are logged as 0 within FLOAT_NOISE


def probe_server(uri: str) -> None:
    """One request to the server's /health, so an unreachable one is a sentence in seconds,
    not MLflow's minutes of retries."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT):
            return
    except urllib.error.HTTPError:
        return  # it answered: a server is there (maybe behind a proxy without /health)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise AutolayerError(
            f"the MLflow tracking server {uri} is unreachable ({reason}); start it, or pass "
            "another --tracking-uri or --no-tracking"
        ) from None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creating a SQLite tracking store: two workers starting at once both ran its
    schema migration and one died on 'duplicate column name'."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def ui_address(tracking_uri: str) -> str | None:
    """Where the MLflow UI of a store is: the server itself, or `mlflow ui` on its default port
    for a store it reads directly (SQLite, a database); None for Databricks."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return None if tracking_uri.startswith("databricks") else LOCAL_UI


def runs_view(created_ms: int) -> dict[str, Any]:
    """A saved view of the experiment's runs table (MLflow >= 3.17's `Views` menu): every run
    flat, best score first, with what tells trials apart as columns. MLflow nests trials under
    the study's run, collapsed, unless the table is sorted by something else than start time."""

    def key(kind: str, name: str) -> str:
        return f"{kind}.`{name}`"  # MLflow's canonical column key

    columns = [key("params", "layers"), key("params", "lr"), key("params", "seed"),
               key("tags", "autolayer.role"), key("tags", "trial_state"),
               key("metrics", "contribution"), key("metrics", "contribution_ci_low"),
               key("metrics", "contribution_ci_high"), key("metrics", "score")]  # fmt: skip
    state = {
        "orderByKey": key("metrics", "score"),  # the order of C where C is defined
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,  # after the run's name, in this order
        "columnWidths": {c: 160 for c in columns if "contribution" in c},  # the whole name
        "runsHiddenMode": "SHOW_ALL",
    }
    return {"name": "autolayer: trials, best first", "createdAt": created_ms,
            "state": json.dumps(state)}  # fmt: skip


def default_tracking_uri(root: Path = DEFAULT_ROOT) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _given_uri(uri: str | None) -> str | None:
    """The explicit URI, else $MLFLOW_TRACKING_URI, checked; None: the default store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and (uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks")):
        raise AutolayerError(
            f"tracking URI {uri!r} is a file store, which MLflow >= 3.13 refuses; "
            "use sqlite:///path/mlflow.db or an http(s):// server"
        )
    return uri


def resolve_tracking_uri(uri: str | None, root: Path = DEFAULT_ROOT) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else SQLite under `root` (created if missing)."""
    given = _given_uri(uri)
    if given:
        return given
    root.mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(root)


def check_tracking(enabled: bool, tracking_uri: str | None) -> None:
    """Refuse what `make_tracker` would refuse for its URI, creating nothing: a file store, or
    a server that does not answer. A search checks first and opens the store last."""
    if not enabled:
        return
    given = _given_uri(tracking_uri)
    if given and given.startswith(("http://", "https://")):
        probe_server(given)


class Tracker(Protocol):
    """What the search and training need from a tracking backend."""

    def start_run(
        self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str: ...
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None: ...
    def log_dict(self, run_id: str, data: Mapping[str, Any], name: str) -> None: ...
    def log_artifact(self, run_id: str, path: Path) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...
    def end_dead_runs(self, role: str) -> list[str]: ...
    def find_run(self, tag: str, value: str) -> str | None: ...
    def lightning_logger(self, run_id: str) -> Any: ...
    def run_url(self, run_id: str) -> str | None: ...
    def runs_url(self) -> str | None: ...


class NullTracker:
    """Tracking switched off: every call is a no-op."""

    def start_run(
        self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        return ""

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None: ...
    def log_dict(self, run_id: str, data: Mapping[str, Any], name: str) -> None: ...
    def log_artifact(self, run_id: str, path: Path) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...

    def end_dead_runs(self, role: str) -> list[str]:
        return []

    def find_run(self, tag: str, value: str) -> str | None:
        return None

    def lightning_logger(self, run_id: str) -> Any:
        return None

    def run_url(self, run_id: str) -> str | None:
        return None

    def runs_url(self) -> str | None:
        return None


class MlflowTracker:
    """A Tracker writing to one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str, root: Path = DEFAULT_ROOT) -> None:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # silence alembic/migration chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        if tracking_uri.startswith(("http://", "https://")):
            probe_server(tracking_uri)
        try:
            with _store_lock(tracking_uri):
                self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
                self.experiment_id = self._experiment(experiment, root)
        except Exception as err:  # mlflow raises many types for an unreachable store
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AutolayerError(f"cannot use MLflow tracking at {tracking_uri}: {first}") from err
        self.experiment = experiment

    def _experiment(self, name: str, root: Path) -> str:
        """The experiment's id, created if missing, shown in MLflow's model-training view."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = str(found.experiment_id)
        else:
            location = None
            if self.tracking_uri.startswith("sqlite:"):
                location = (root / "artifacts").resolve().as_uri()  # artifacts under mlruns/
            experiment_id = str(self.client.create_experiment(name, artifact_location=location))
        if found is None or found.tags.get(KIND_TAG) != KIND:
            self.client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
        if found is None or VIEW_TAG not in found.tags:
            view = json.dumps(runs_view(int(time.time() * 1000)))
            self.client.set_experiment_tag(experiment_id, VIEW_TAG, view)
        return experiment_id

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI."""
        address = ui_address(self.tracking_uri)
        if address is None:
            return None
        return f"{address}/#/experiments/{self.experiment_id}/runs/{run_id}?{ML_PAGES}"

    def runs_url(self) -> str | None:
        """The experiment's runs table in the saved view, in the model-training (not GenAI)
        pages: where the printed `mlflow ui` command sends a user."""
        address = ui_address(self.tracking_uri)
        if address is None:
            return None
        runs = f"{address}/#/experiments/{self.experiment_id}/runs"
        return f"{runs}?viewStateShareKey={VIEW_KEY}&{ML_PAGES}"

    def start_run(
        self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        # who runs it: a later start ends the runs of processes that were killed (end_dead_runs)
        all_tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0) for k, v in metrics.items() if math.isfinite(v)
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_dict(self, run_id: str, data: Mapping[str, Any], name: str) -> None:
        self.client.log_dict(run_id, dict(data), name)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import IntegrityError

        for key, value in tags.items():
            try:
                self.client.set_tag(run_id, key, value)
            except MlflowException as err:
                if not isinstance(err.__cause__, IntegrityError):
                    raise
                # Two workers tagged the study's shared parent run at the same instant: MLflow's
                # SQL store merges by select-then-insert, so both inserted and one lost. The row
                # exists now, and the same merge updates it.
                self.client.set_tag(run_id, key, value)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def end_dead_runs(self, role: str) -> list[str]:
        """End KILLED this experiment's RUNNING runs of `role` whose process died on this host
        (a killed process cannot end its own run); returns their ids."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`autolayer.role` = '{role}' and attributes.status = 'RUNNING'",
        )
        ended = []
        for run in runs:
            pid = run.data.tags.get(PID_TAG, "")
            if pid.isdigit() and died_here(run.data.tags.get(HOST_TAG), int(pid)):
                self.client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
        return ended

    def find_run(self, tag: str, value: str) -> str | None:
        """The oldest top-level RUNNING run of this experiment whose `tag` is `value`: one a
        killed process made but could not record anywhere."""
        if "'" in value:
            return None  # not expressible in a filter string; a new run is made instead
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time ASC"],
        )
        top = [run for run in runs if PARENT_TAG not in run.data.tags]
        return str(top[0].info.run_id) if top else None

    def lightning_logger(self, run_id: str) -> Any:
        """Lightning's MLFlowLogger bound to an existing run: it must be given the URI explicitly,
        since its default is the `file:./mlruns` store that MLflow >= 3.13 refuses."""
        from lightning.pytorch.loggers import MLFlowLogger

        class _OpenMLFlowLogger(MLFlowLogger):
            """Leaves the run open at the end of `fit`: the trial logs its final score,
            contribution and state afterwards and closes the run itself."""

            def finalize(self, status: str = "success") -> None:
                pass

            def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
                super().log_metrics(denoised(metrics), step)

            @property
            def experiment(self) -> Any:
                # MLFlowLogger calls mlflow.set_tracking_uri, which also exports
                # MLFLOW_TRACKING_URI: a later search in this process (or a child process)
                # would then log to this store instead of its own. Undo that.
                before = os.environ.get("MLFLOW_TRACKING_URI")
                try:
                    return super().experiment
                finally:
                    if before is None:
                        os.environ.pop("MLFLOW_TRACKING_URI", None)
                    else:
                        os.environ["MLFLOW_TRACKING_URI"] = before

        return _OpenMLFlowLogger(
            experiment_name=self.experiment, tracking_uri=self.tracking_uri, run_id=run_id
        )


def denoised(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with a loss or KL within float32 noise of 0 logged as 0 (`FLOAT_NOISE`)."""
    return {
        k: 0.0 if k.endswith(NOISY_METRICS) and abs(v) < FLOAT_NOISE else v
        for k, v in metrics.items()
    }


def make_tracker(
    enabled: bool, tracking_uri: str | None, experiment: str, root: Path = DEFAULT_ROOT
) -> Tracker:
    if not enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(tracking_uri, root), experiment, root)
