"""Where a study lives: an Optuna storage from a URL, and recovery of trials whose worker died.

URLs (`search.storage`):
- none: the default, a journal file `mlruns/optuna/journal.log`.
- `journal:PATH`: a journal file at PATH (our own scheme). Several worker processes on one machine
  can share it (a lock file serialises writes); SQLite is not meant for concurrent workers.
- `sqlite:///PATH`: one worker at a time.
- `postgresql://...`, `postgresql+psycopg2://...`, `mysql...://...`: workers on many machines; the
  storage heartbeats, so a trial whose worker was killed is failed and retried once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from autolayer.errors import AutolayerError
from autolayer.processes import died_here
from autolayer.study import (
    StudyRecord,
    TrialRecord,
    trial_fields,
    trial_seed,
    write_stored_trial,
    write_study,
    write_trial,
)
from autolayer.tracking import DEFAULT_ROOT  # the local store: Optuna and MLflow files

JOURNAL_SCHEME = "journal:"
HEARTBEAT_INTERVAL = 60  # seconds between a running trial's heartbeats
GRACE_PERIOD = 120  # a trial without a heartbeat this long belongs to a dead worker
CONNECT_TIMEOUT = 10  # seconds before an unreachable PostgreSQL server is an error
WORKER_DIED = "worker died (killed or crashed) while running this trial"

_RDB_DIALECTS = {"sqlite", "postgresql", "mysql", "mariadb"}


def default_storage_url(root: Path = DEFAULT_ROOT) -> str:
    """The default storage as a URL: a journal file under `root`."""
    return f"{JOURNAL_SCHEME}{root}/optuna/journal.log"


def make_storage(url: str | None, root: Path = DEFAULT_ROOT) -> BaseStorage:
    """Open (creating if needed) the storage at `url`; None means `default_storage_url(root)`.

    A bad URL, a missing driver or an unreachable database is a one-sentence AutolayerError.
    """
    url = url or default_storage_url(root)
    if url.startswith(JOURNAL_SCHEME):
        return _journal_storage(Path(url[len(JOURNAL_SCHEME) :]).expanduser())
    scheme = url.split(":", 1)[0] if ":" in url else ""
    dialect = scheme.split("+", 1)[0].lower()
    if dialect not in _RDB_DIALECTS:
        raise AutolayerError(
            f"unknown storage URL scheme {scheme or url!r}; use journal:PATH, sqlite:///PATH, "
            "postgresql://USER@HOST/DB or mysql://USER@HOST/DB"
        )
    return _rdb_storage(url, dialect)


def check_storage(url: str | None, root: Path = DEFAULT_ROOT) -> None:
    """Refuse what `make_storage` would refuse, creating nothing here: a journal or SQLite file
    must be writable where it is or could be made; a database server is connected to (which
    makes its tables there). So a search checks its storage first and opens it last, after the
    model loads, and a refusal in between leaves no empty study file behind."""
    url = url or default_storage_url(root)
    if url.startswith(JOURNAL_SCHEME):
        path = Path(url[len(JOURNAL_SCHEME) :]).expanduser()
        if not path.name:
            raise AutolayerError("a journal storage URL needs a file path: journal:PATH")
        _check_writable(path, "the journal storage")
        return
    database = _sqlite_file(url)
    if database is not None:
        _check_writable(database, "the storage")
        return
    make_storage(url, root)  # a URL error, or a server to reach


def _sqlite_file(url: str) -> Path | None:
    """The file of a well-formed sqlite:/// URL (None for anything else, or in memory)."""
    if not url.split(":", 1)[0].lower().startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        return None  # make_storage says what is wrong with it
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _check_writable(path: Path, what: str) -> None:
    """`path` is a file that exists and is writable, or its nearest existing folder is one."""
    if path.exists():
        if path.is_dir() or not os.access(path, os.W_OK):
            raise AutolayerError(f"cannot open {what} {path}: it is a folder or not writable")
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise AutolayerError(f"cannot open {what} {path}: {folder} is not a writable folder")


def load_study(study_name: str, url: str | None, root: Path = DEFAULT_ROOT) -> optuna.Study:
    """Open an existing study by name (for reading results); a wrong name lists the stored ones."""
    url = url or default_storage_url(root)
    journal = (
        Path(url[len(JOURNAL_SCHEME) :]).expanduser() if url.startswith(JOURNAL_SCHEME) else None
    )
    if journal is not None and not journal.is_file():
        raise AutolayerError(f"no study named {study_name!r}: the storage {journal} does not exist")
    storage = make_storage(url, root)
    names = sorted(study.study_name for study in storage.get_all_studies())
    if study_name not in names:
        raise AutolayerError(
            f"no study named {study_name!r} in {url}; stored studies: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def _journal_storage(path: Path) -> JournalStorage:
    if not path.name:
        raise AutolayerError("a journal storage URL needs a file path: journal:PATH")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise AutolayerError(f"cannot open the journal storage {path}: {err.strerror}") from None


def _rdb_storage(url: str, dialect: str) -> RDBStorage:
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 defaults to psycopg 3; our dependency is psycopg2-binary. Name a driver
        # (postgresql+psycopg://) to use another one.
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        raise AutolayerError(f"storage URL {url!r} is not a valid database URL") from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # workers idle for hours between writes
    if dialect == "sqlite":
        _make_sqlite_parent(url)
    if dialect == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", ExperimentalWarning)
            heartbeat = _heartbeat_kwargs() if dialect != "sqlite" else {}
            # The constructor connects (it creates the tables), which probes the database once.
            try:
                return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers started together race to create the schema; the loser finds it made.
                time.sleep(1.0)
                return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except ImportError:
        raise AutolayerError(
            f"storage {shown} needs a database driver that is not installed (PostgreSQL: "
            "pip install psycopg2-binary; MySQL: pip install pymysql and use mysql+pymysql://)"
        ) from None
    except sqlalchemy.exc.ArgumentError as err:
        raise AutolayerError(f"storage URL {shown} is not valid: {_first_line(err)}") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = _first_line(getattr(err, "orig", None) or err)
        raise AutolayerError(f"cannot connect to the storage {shown}: {reason}") from None


def _heartbeat_kwargs() -> dict[str, Any]:
    """A running trial heartbeats every minute; one silent for two minutes is failed and retried
    once (Optuna checks before each new trial, or call `recover_stale_trials`)."""
    return {
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "grace_period": GRACE_PERIOD,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1),
    }


def _make_sqlite_parent(url: str) -> None:
    database = _sqlite_file(url)
    if database is not None:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AutolayerError(
                f"cannot create the folder of {database}: {err.strerror}"
            ) from None


def _first_line(err: object) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------- stale trials


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs `trial`, so `recover_stale_trials` can tell when it died."""
    write_trial(trial, worker_host=socket.gethostname(), worker_pid=os.getpid())


def _died_here(trial: optuna.trial.FrozenTrial) -> bool:
    record = TrialRecord.of(trial)
    return died_here(record.worker_host, record.worker_pid)


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker died, retry each once, and return their numbers.

    Journal and SQLite storages have no heartbeat, so a trial counts as dead when it was started
    (see `mark_worker`) on this host by a process that no longer exists. Its params are enqueued
    again with user attr `retry_of` (a retry that dies too is not retried). Trials of workers on
    other hosts are left alone. Storages with heartbeats (PostgreSQL, MySQL) also fail trials whose
    heartbeat stopped, on any host, and retry them through their callback.
    """
    # `_storage` and `_trial_id` are private, but Study has no public way to finish another
    # process's trial (`study.tell` would also run the sampler's after_trial hook).
    storage = study._storage
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _died_here(trial):
            continue
        try:
            write_stored_trial(storage, trial._trial_id, fail_reason=WORKER_DIED)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another process recovered it first
            continue
        failed.append(trial.number)
        if trial.params and TrialRecord.of(trial).retry_of is None:
            attrs = {**trial_fields(retry_of=trial.number), **queued_attrs(study, trial)}
            study.enqueue_trial(trial.params, user_attrs=attrs)
    return sorted(failed + _fail_heartbeat_stale(study))


MAX_ATTEMPTS = 3  # a failed candidate is tried at most this often, counting its first try
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# How the study tells runs apart. A candidate is a point of the search space, known to the
# study by its Optuna params before any trial of it has run (the layers and lr it trains are
# recorded only once a trial starts: `study.CandidateKey`).
ParamsKey = tuple[tuple[str, Any], ...]  # a candidate's Optuna params, sorted by name
AttemptKey = tuple[ParamsKey, int]  # one proxy run: a candidate and its training seed


def params_key(trial: FrozenTrial | optuna.Trial) -> ParamsKey:
    """A trial's params; a WAITING (enqueued) trial keeps them in Optuna's `fixed_params`."""
    params = trial.params
    if not params and isinstance(trial, FrozenTrial):
        params = trial.system_attrs.get("fixed_params", {})
    return tuple(sorted(params.items()))


SEED_CLAIM = "{study}.proxy-seed-claimed"  # a marker study while held; see `claimed`
SEED_WAIT = 30.0  # seconds a joining worker waits for the claiming one to record its seed


def study_proxy_seed(study: optuna.Study, storage: Any, seed: int) -> int:
    """The training seed every worker of `study` runs search trials on: the first worker's.

    Workers started with different `--seed`s would otherwise train the same candidate on
    different seeds, and an exhaustive search would run it once per worker. One worker at a time
    holds the claim (as for the warm start) and records its seed unless one is recorded; the
    others wait the few milliseconds until it is.
    """
    recorded = StudyRecord.of(study).proxy_seed
    if recorded is not None:
        return recorded
    with claimed(storage, SEED_CLAIM.format(study=study.study_name)) as mine:
        recorded = StudyRecord.of(study).proxy_seed  # a claimer that came and went meanwhile
        if mine and recorded is None:
            write_study(study, proxy_seed=seed)
            return seed
    deadline = time.monotonic() + SEED_WAIT
    while (recorded := StudyRecord.of(study).proxy_seed) is None:
        if time.monotonic() > deadline:
            # The claimer died before recording it, leaving its marker: record this worker's
            # own seed. Two workers doing so at once is the only way they can disagree, and
            # only then.
            write_study(study, proxy_seed=seed)
        time.sleep(0.05)
    return recorded


def attempt_key(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> AttemptKey:
    """A trial's params and training seed: what one proxy run measures. Racing repeats a
    candidate on new seeds (`autolayer.racing`)."""
    return (params_key(trial), trial_seed(study, trial))


def queued_attrs(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The user attrs a rerun of `trial` keeps: its seed and its role (repeat or baseline)."""
    role = TrialRecord.of(trial).role
    seed = trial_seed(study, trial)
    return trial_fields(seed=seed) if role is None else trial_fields(seed=seed, role=role)


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial is an attempt at its candidate (a worker's duplicate is not)."""
    return bool(params_key(trial)) and TrialRecord.of(trial).duplicate_of is None


def earlier_twin(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """An earlier trial running, or done with, this trial's params: another worker got there
    first. Exhaustive samplers hand two workers that ask at the same moment the same point."""
    key = attempt_key(study, trial)
    queued = TrialRecord.of(trial).queued
    for other in study.get_trials(
        deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    ):
        if other.number < trial.number and counts(other) and attempt_key(study, other) == key:
            if queued and other.state == TrialState.PRUNED:
                continue  # a baseline reruns a pruned candidate to the end on purpose
            return other.number
    return None


def claim(storage: Any, name: str) -> bool:
    """Atomically create the marker study `name`: True for the one worker that created it.

    Creating a study is atomic in every Optuna storage (a unique name in the journal and in the
    database), so the first worker to create it wins and every other is told so.
    """
    try:
        with quiet_optuna():  # a marker, not a study to announce
            optuna.create_study(study_name=name, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created in Journal with name: ...") off for the block:
    the search's display says what a person needs, on stdout."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def claimed(storage: Any, name: str) -> Iterator[bool]:
    """Hold `name` across all workers and hosts while the block runs: yields True to the one
    worker holding it, False to any other trying meanwhile.

    The hold is the marker study of `claim`, deleted when the block ends, so optuna-dashboard
    lists it only for those milliseconds (or after a worker died holding it). Since a later
    worker may hold it again, the block checks that its work is not done yet (a study attr the
    holder writes before it lets go: a later holder reads it, as storage writes are ordered).
    """
    mine = claim(storage, name)
    try:
        yield mine
    finally:
        if mine:
            storage.delete_study(storage.get_study_id_from_name(name))


def _attempts(study: optuna.Study) -> dict[AttemptKey, list[FrozenTrial]]:
    """Each (candidate, seed)'s trials in trial order, a worker's duplicates left out."""
    grouped: dict[AttemptKey, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        if counts(trial):
            grouped.setdefault(attempt_key(study, trial), []).append(trial)
    return grouped


def _exhausted(trials: list[FrozenTrial]) -> bool:
    fails = sum(t.state == TrialState.FAIL for t in trials)
    return fails >= MAX_ATTEMPTS and not any(t.state in FINISHED for t in trials)


def exhausted_candidates(study: optuna.Study) -> set[ParamsKey]:
    """Candidates that failed MAX_ATTEMPTS times and never finished: no rerun tries them again."""
    return {key[0] for key, trials in _attempts(study).items() if _exhausted(trials)}


def retry_failed(study: optuna.Study) -> list[FrozenTrial]:
    """Enqueue every failed candidate again, up to MAX_ATTEMPTS tries, unless it finished (a
    COMPLETE or PRUNED trial of the same params) or is already waiting or running. Returns the
    last failed trial of each candidate retried, whose fail_reason says why."""
    retried = []
    for key, trials in _attempts(study).items():
        if _exhausted(trials) or any(t.state != TrialState.FAIL for t in trials):
            continue  # spent, finished, or already waiting or running again
        attrs = {**trial_fields(retry_of=trials[-1].number), **queued_attrs(study, trials[-1])}
        study.enqueue_trial(dict(key[0]), user_attrs=attrs)
        retried.append(trials[-1])
    return retried


def _fail_heartbeat_stale(study: optuna.Study) -> list[int]:
    """Optuna's own recovery for storages with heartbeats; returns the trials it failed."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
    now_failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return [t.number for t in now_failed if t.number in running]
