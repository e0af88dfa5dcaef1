"""Storage: the journal default, URL errors, recovery of dead workers' trials, shared studies."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from autolayer.errors import AutolayerError
from autolayer.storage import (
    WORKER_DIED,
    default_storage_url,
    load_study,
    make_storage,
    mark_worker,
    recover_stale_trials,
)
from autolayer.study import TrialRecord, write_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _fake_objective(trial: optuna.Trial) -> float:
    """Stands in for a proxy run: peak at layer 3, a short sleep so workers interleave."""
    layer = trial.suggest_int("layer", 0, 7)
    mark_worker(trial)
    time.sleep(0.02)
    return float(-((layer - 3) ** 2))


def _storage_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"journal:{tmp_path}/study.log"


def test_default_is_a_journal_under_root_that_a_second_storage_resumes(tmp_path: Path) -> None:
    assert default_storage_url(tmp_path) == f"journal:{tmp_path}/optuna/journal.log"
    study = optuna.create_study(
        study_name="scan", storage=make_storage(None, root=tmp_path), direction="maximize"
    )
    study.optimize(_fake_objective, n_trials=3)
    assert (tmp_path / "optuna" / "journal.log").is_file()

    resumed = optuna.load_study(study_name="scan", storage=make_storage(None, root=tmp_path))
    assert [t.state for t in resumed.trials] == [TrialState.COMPLETE] * 3
    assert [t.params for t in resumed.trials] == [t.params for t in study.trials]
    resumed.optimize(_fake_objective, n_trials=1)
    assert [t.number for t in resumed.trials] == [0, 1, 2, 3]


def test_load_study_names_the_stored_studies_when_the_name_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(AutolayerError, match="the storage .*journal.log does not exist"):
        load_study("scan", None, root=tmp_path)
    optuna.create_study(study_name="scan", storage=make_storage(None, root=tmp_path))
    assert load_study("scan", None, root=tmp_path).study_name == "scan"
    with pytest.raises(AutolayerError, match="no study named 'scna' in .*; stored studies: scan"):
        load_study("scna", None, root=tmp_path)


def test_journal_and_sqlite_urls_create_their_folders(tmp_path: Path) -> None:
    journal = make_storage(f"journal:{tmp_path}/a/b/j.log")
    assert (tmp_path / "a" / "b" / "j.log").is_file()
    sqlite = make_storage(f"sqlite:///{tmp_path}/c/optuna.db")
    assert isinstance(sqlite, RDBStorage) and (tmp_path / "c" / "optuna.db").is_file()
    assert sqlite.heartbeat_interval is None  # one local worker: recover_stale_trials covers it
    for storage in (journal, sqlite):
        optuna.create_study(storage=storage).optimize(_fake_objective, n_trials=1)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://nobody@127.0.0.1:1/x", "cannot connect to the storage postgresql"),
        ("postgresql://nobody:secret@127.0.0.1:1/x", "nobody:***@127.0.0.1:1/x"),
        ("foo://bar", "unknown storage URL scheme 'foo'"),
        ("mlruns/optuna.db", "unknown storage URL scheme"),
        ("journal:", "needs a file path"),
        ("postgresql+nodriver://u@h/x", "is not valid"),
    ],
)
def test_bad_urls_are_one_sentence_errors(url: str, message: str) -> None:
    with pytest.raises(AutolayerError, match=message.replace("*", r"\*")) as info:
        make_storage(url)
    assert "secret" not in str(info.value)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _start_trial(study: optuna.Study, pid: int) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_int("layer", 0, 7)
    mark_worker(trial)
    write_trial(trial, worker_pid=pid)
    return trial


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_recover_fails_a_dead_workers_trial_and_retries_it_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage = make_storage(_storage_url(kind, tmp_path, request))
    study = optuna.create_study(study_name=f"recover-{kind}", storage=storage)
    dead = _start_trial(study, _dead_pid())
    alive = _start_trial(study, os.getpid())
    elsewhere = _start_trial(study, _dead_pid())
    write_trial(elsewhere, worker_host="another-machine")  # its pid means nothing here
    unmarked = study.ask()

    assert recover_stale_trials(study) == [dead.number]
    failed = study.trials[dead.number]
    assert failed.state == TrialState.FAIL
    assert TrialRecord.of(failed).fail_reason == WORKER_DIED
    for trial in (alive, elsewhere, unmarked):
        assert study.trials[trial.number].state == TrialState.RUNNING
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and TrialRecord.of(waiting[0]).retry_of == dead.number
    assert recover_stale_trials(study) == []  # nothing new died

    retry = study.ask()  # the enqueued retry comes first, with the dead trial's params
    assert retry.suggest_int("layer", 0, 7) == failed.params["layer"]
    mark_worker(retry)
    write_trial(retry, worker_pid=_dead_pid())
    assert recover_stale_trials(study) == [retry.number]
    assert study.get_trials(states=(TrialState.WAITING,)) == []  # a retry is not retried


def test_postgres_storage_heartbeats_and_retries_stale_trials_once(postgres_url: str) -> None:
    storage = make_storage(postgres_url)
    assert isinstance(storage, RDBStorage)
    assert (storage.heartbeat_interval, storage.grace_period) == (60, 120)
    callback = storage.heartbeat_stale_trial_callback
    assert isinstance(callback, RetryHeartbeatStaleTrialCallback) and callback._max_retry == 1


def _worker(url: str, study_name: str, seed: int) -> None:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)
    study = optuna.load_study(study_name=study_name, storage=make_storage(url), sampler=sampler)
    study.optimize(_fake_objective, n_trials=6)


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_two_worker_processes_share_one_study(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _storage_url(kind, tmp_path, request)
    name = f"two-workers-{kind}"
    optuna.create_study(study_name=name, storage=make_storage(url), direction="maximize")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(url, name, seed)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]

    trials = optuna.load_study(study_name=name, storage=make_storage(url)).trials
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {TrialRecord.of(t).worker_pid for t in trials} == {w.pid for w in workers}


def test_a_claim_is_held_by_one_worker_and_leaves_no_study_behind(tmp_path: Path) -> None:
    from autolayer.storage import claimed

    storage = make_storage(f"journal:{tmp_path / 'j.log'}")
    optuna.create_study(study_name="s", storage=storage)
    # the second: another worker trying meanwhile
    with claimed(storage, "s.warm-start") as first, claimed(storage, "s.warm-start") as second:
        assert (first, second) == (True, False)
        assert "s.warm-start" in optuna.get_all_study_names(storage)
    assert optuna.get_all_study_names(storage) == ["s"]  # optuna-dashboard lists the study only
    with claimed(storage, "s.warm-start") as later:
        assert later  # held again: the block checks whether its work is done


def _claimant(url: str, name: str, seed: int, barrier: Any, holding: str) -> None:
    """A worker starting at the same instant as the others: it takes the study's seed, then
    enqueues the warm start unless another worker did, as `runner.prepare` does, ten times."""
    from autolayer.storage import claimed, study_proxy_seed
    from autolayer.study import StudyRecord, write_study

    storage = make_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    barrier.wait()
    Path(holding + f".seed{seed}").write_text(str(study_proxy_seed(study, storage, seed)))
    for _ in range(10):
        with claimed(storage, f"{name}.warm-start-claimed") as mine:
            if not mine:
                continue
            fd = os.open(holding, os.O_CREAT | os.O_EXCL)  # fails if another holds it too
            if not StudyRecord.of(study).warm_start_enqueued:
                study.enqueue_trial({"layer": seed})
                write_study(study, warm_start_enqueued=True)
            os.close(fd)
            os.unlink(holding)


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_claims_stay_atomic_across_worker_processes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from autolayer.study import StudyRecord

    url = _storage_url(kind, tmp_path, request)
    name = f"claims-{kind}"
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    holding = str(tmp_path / "holding")
    workers = [
        context.Process(target=_claimant, args=(url, name, seed, barrier, holding))
        for seed in (1, 2, 3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]  # no two ever held the claim at once
    assert len(study.get_trials()) == 1  # the warm start, enqueued once
    taken = {Path(f"{holding}.seed{seed}").read_text() for seed in (1, 2, 3)}
    assert taken == {str(StudyRecord.of(study).proxy_seed)}  # every worker trains on one seed
    names = optuna.get_all_study_names(make_storage(url))
    assert not [n for n in names if n.startswith(name + ".")]  # no marker study left


def test_every_worker_trains_on_the_first_workers_seed(tmp_path: Path) -> None:
    from autolayer.storage import study_proxy_seed
    from autolayer.study import StudyRecord

    storage = make_storage(f"journal:{tmp_path / 'j.log'}")
    first = optuna.create_study(study_name="s", storage=storage)
    second = optuna.load_study(study_name="s", storage=storage)  # another worker's handle
    assert study_proxy_seed(first, storage, 7) == 7
    assert study_proxy_seed(second, storage, 3) == 7  # the joining worker's own seed loses
    assert StudyRecord.of(second).proxy_seed == 7


def test_a_worker_waits_for_the_claimed_seed_then_records_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimer that died before recording the seed (or a study made again under an old name)
    does not block the study for good."""
    from autolayer import storage as storage_module
    from autolayer.storage import SEED_CLAIM, claim, study_proxy_seed

    storage = make_storage(f"journal:{tmp_path / 'j.log'}")
    study = optuna.create_study(study_name="s", storage=storage)
    assert claim(storage, SEED_CLAIM.format(study="s"))  # a worker that died before recording
    monkeypatch.setattr(storage_module, "SEED_WAIT", 0.1)
    assert study_proxy_seed(study, storage, 3) == 3
    assert study_proxy_seed(optuna.load_study(study_name="s", storage=storage), storage, 9) == 3


def test_the_later_of_two_twins_is_the_duplicate() -> None:
    from autolayer.storage import earlier_twin

    study = optuna.create_study()
    first, second = study.ask(), study.ask()  # two workers asking at the same instant
    first.suggest_int("layer", 3, 3)
    second.suggest_int("layer", 3, 3)
    assert earlier_twin(study, second) == first.number
    assert earlier_twin(study, first) is None  # the earlier one runs on
    study.tell(first, 0.5)
    assert earlier_twin(study, second) == first.number  # and a finished twin still counts
