"""The sandbox refuses or contains every hostile program, scores it 0, and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autolayer import sandbox
from autolayer.coding import passes_tests, program, truncate

FAST = sandbox.Limits(wall_seconds=4.0, cpu_seconds=2, memory_bytes=512 << 20)


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line or working directory mentions `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes().decode(errors="replace")
            text += os.readlink(entry / "cwd")
        except OSError:
            continue
        if marker in text:
            found.append(int(entry.name))
    return found


def run(source: str) -> sandbox.Outcome:
    return sandbox.run_program(source, FAST)


def test_a_passing_and_a_failing_program() -> None:
    assert run("assert sum([1, 2]) == 3") == sandbox.Outcome(True, "passed")
    failed = run("assert sum([1, 2]) == 4")
    assert (failed.passed, failed.status) == (False, "failed")
    assert "AssertionError" in failed.detail


def test_an_infinite_loop_is_stopped_within_the_limits() -> None:
    outcome = run("while True:\n    pass\n")  # the limit stops it: no wall-clock bound here
    assert (outcome.passed, outcome.status) == (False, "timeout")


def test_a_memory_bomb_hits_the_address_space_limit() -> None:
    outcome = run("x = bytearray(8 * 1024 ** 3)\nassert len(x) > 0")
    assert not outcome.passed and "MemoryError" in outcome.detail


def test_a_fork_bomb_is_refused_and_leaves_no_process(tmp_path: Path) -> None:
    marker = f"forkbomb-{os.getpid()}"
    outcome = run(f"import os\n# {marker}\nwhile True:\n    os.fork()\n")
    assert (outcome.passed, outcome.status) == (False, "refused")
    assert processes_mentioning(marker) == []


def test_writing_outside_the_working_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    outcome = run(f"open({str(target)!r}, 'w').write('x')")
    assert (outcome.passed, outcome.status) == (False, "refused")
    assert not target.exists()
    inside = run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'")
    assert inside.passed  # its own empty directory is writable


def test_no_environment_secret_reaches_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOLAYER_TEST_SECRET", "hunter2")
    outcome = run("import os\nassert os.environ.get('AUTOLAYER_TEST_SECRET') == 'hunter2'")
    assert not outcome.passed
    assert run("import os\nassert 'AUTOLAYER_TEST_SECRET' not in os.environ").passed


def test_a_socket_is_refused() -> None:
    outcome = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert (outcome.passed, outcome.status) == (False, "refused")


def test_exiting_early_does_not_pass() -> None:
    assert not run("import sys\nsys.exit(0)\nassert False").passed
    assert not run("import os\nos._exit(0)\nassert False").passed
    assert not run("raise SystemExit(0)").passed


def test_nothing_is_left_running_after_a_timeout() -> None:
    marker = f"sleeper-{os.getpid()}"
    outcome = run(f"import time\n# {marker}\ntime.sleep(60)\n")
    assert outcome.status == "timeout"
    assert processes_mentioning(marker) == []


def test_the_working_directory_is_empty_and_removed() -> None:
    listing = "import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')"
    assert run(listing).passed
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("autolayer-sandbox-*")]
    assert leftovers == []


def test_the_os_layers_are_in_force_where_the_os_allows_them() -> None:
    """Beneath the audit hook: a network namespace with only a loopback, and PID 1 of its own."""
    layers = sandbox.isolation()
    assert set(layers) == {"network", "pid", "drop_user"}
    if not (layers["network"] and layers["pid"]):
        pytest.skip(f"namespaces are refused here: {layers}")
    interfaces = (
        "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
        "assert names == ['lo'], names\n"
    )
    assert run(interfaces).passed
    assert run("import os\nassert os.getpid() == 1, os.getpid()").passed


def test_a_batch_of_programs_gets_every_outcome_and_identical_ones_run_once() -> None:
    cache = sandbox.ProgramCache()
    sources = [f"assert {i} * 2 == {2 * i}" for i in range(12)] + ["assert False"] * 4
    outcomes = sandbox.run_programs(sources, FAST, cache)
    assert [o.passed for o in outcomes] == [True] * 12 + [False] * 4
    assert len(cache._items) == 13  # the four identical failures ran once


def test_a_hostile_completion_scores_zero_through_the_reward() -> None:
    prompt = "def f(x):\n    "
    test = "assert f(2) == 4"
    completions = [
        "return x * 2",
        "while True: pass",
        "import os; os.fork()",
        "return open('/etc/passwd').read()",
    ]
    rewards = passes_tests([prompt] * 4, completions, [test] * 4)
    assert rewards[0] == 1.0 and rewards[2:] == [0.0, 0.0]


def test_program_joins_prompt_body_tests_and_check() -> None:
    assert truncate("    return 1\ndef g():\n    pass") == "    return 1"
    assert program("def f():\n", "    return 1", "def check(c):\n    assert c() == 1", "f") == (
        "def f():\n    return 1\n\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
    )
