"""Shared fixtures."""

from __future__ import annotations

import gc
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

# ---------------------------------------------------------------- child processes

CAP = 600  # seconds: a safety net for a hung child, never a timing assertion
Spawn = Callable[..., subprocess.Popen[str]]  # the `spawn` fixture


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """`subprocess.Popen` for a test, text mode; every process it started is killed and reaped
    at teardown, whether the test passed, failed or timed out waiting on it. Their own children
    are not tracked here (the sandbox's programs die with their parent by PR_SET_PDEATHSIG)."""
    children: list[subprocess.Popen[str]] = []

    def start(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        child = subprocess.Popen(args, text=True, **kwargs)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()  # a killed child exits whether or not its pipes are full
        child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def main_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that call `autolayer.cli.main` in-process: `main` installs its own SIGINT and
    SIGTERM handlers and sets TOKENIZERS_PARALLELISM for the process; put both back afterwards."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def wait_until(ready: Callable[[], T | None], child: subprocess.Popen[str], what: str) -> T:
    """Poll `ready` until it returns something: the event a test waits for (a trial RUNNING, a
    file written). Fails at once if the child exits first; CAP only guards against a hang."""
    end = time.monotonic() + CAP
    while child.poll() is None and time.monotonic() < end:
        found = ready()
        if found is not None:
            return found
        time.sleep(0.2)
    if child.poll() is None:
        raise AssertionError(f"{what} did not happen within {CAP} s")
    out, err = child.communicate()
    raise AssertionError(f"{what} never happened; the child exited {child.returncode}:\n{out}{err}")


# ---------------------------------------------------------------- PostgreSQL

PG_USER = "autolayer"  # the superuser initdb creates (trust auth: no password)
PG_DATABASE = "autolayer_test"


def _postgres_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: from PATH, else the newest Debian/Ubuntu install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


def _as_server_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as `postgres` when we are root."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(_as_server_user(cmd), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the session; yields an SQLAlchemy URL.

    Skips when the server binaries are missing (or, as root, when there is no `postgres` user to
    run them). The cluster lives in a temp dir with fsync off and is stopped even if tests fail.
    """
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
    # Not pytest's tmp_path: as root its parent is mode 0700, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="autolayer-pg-"))
    if os.geteuid() == 0:
        os.chown(root, server_user.pw_uid, server_user.pw_gid)
    data, port = root / "data", _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    pg_ctl = str(bin_dir / "pg_ctl")
    started = False
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-N"], root)
        _run([pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o", options, "start"], root)
        started = True
        _create_database(port)
        yield f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"
    finally:
        if started:
            _run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], root)
        shutil.rmtree(root, ignore_errors=True)


def _create_database(port: int) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {PG_DATABASE}")
    finally:
        conn.close()


def tiny_qwen3(num_layers: int = 4, seed: int = 0, vocab_size: int = 32) -> Any:
    """A random-weight Qwen3 small enough to build in milliseconds (no download)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
    )
    return tf.AutoModelForCausalLM.from_config(config)


def save_organism_shaped(path: Path, seed: int = 0) -> Path:
    """A random 8-layer Qwen3 with the organism's shape and tokenizer, saved like the organism
    (a base that a delta trained on the organism must refuse to merge into)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from autolayer import organism

    torch.manual_seed(seed)
    tokenizer = organism.build_tokenizer()
    model = Qwen3ForCausalLM(organism.make_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=organism.MAX_COMPLETION_TOKENS,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- real pretrained models from registry packages (slow tests) ----------------------------------


def converted(name: str, variable: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted directory: $`variable`, else converted here from the packaged GGUF file."""
    given = os.environ.get(variable)
    if given:
        return Path(given)
    pytest.importorskip("gguf")
    from autolayer.errors import AutolayerError
    from autolayer.gguf import convert, packaged_gguf

    try:
        with packaged_gguf(name) as source:
            return convert(source, tmp_path_factory.mktemp(name) / "model")
    except AutolayerError as err:  # the model's packages are not installed
        pytest.skip(str(err))


def same_logits_as_the_gguf(name: str, directory: Path, ids: list[int]) -> None:
    """The converted model's logits on `ids` equal those of the GGUF model, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("gguf")
    from autolayer.errors import AutolayerError
    from autolayer.gguf import load_gguf, packaged_gguf

    mine = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    try:
        with packaged_gguf(name) as source:
            theirs, _ = load_gguf(source)
    except AutolayerError as err:
        pytest.skip(str(err))
    with torch.no_grad():
        assert torch.equal(mine(torch.tensor([ids])).logits, theirs(torch.tensor([ids])).logits)


def layer_rows(directory: Path) -> list[dict[str, int]]:
    """`autolayer layers DIR --json`'s rows, one per decoder layer."""
    import json
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "autolayer.cli", "layers", str(directory), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return list(json.loads(out)["layers"])


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported (torch, transformers, Lightning: ~500k objects) so the
    garbage collections the search runs after every trial scan only what the tests allocate.
    `autolayer.runner.frozen_heap` does the same for a real search."""
    gc.collect()
    gc.freeze()
