"""The CLI: input errors come before any model library loads, as one sentence with exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

PROBE = (
    "import sys; from autolayer.cli import main; code = main(sys.argv[1:]); "
    "heavy = [m for m in ('torch', 'transformers', 'datasets', 'lightning') if m in sys.modules]; "
    "print('HEAVY', heavy); sys.exit(code)"
)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("config", "space", "message"),
    [
        ({"proxy": {"stepz": 3}}, None, "unknown config key 'proxy.stepz'"),
        ({"search": {"study_name": "../x"}}, None, "study_name must be a plain name"),
        ({}, {"kind": "single_layer", "layers": [3, 12]}, "do not fit the model; valid layers"),
        ({}, {"kind": "nope"}, "kind"),
        ({"proxy": {"devices": 2, "strategy": "ddp"}}, None, "proxy.devices must be 1"),
    ],
)
def test_input_errors_come_before_any_model_library_loads(
    tmp_path: Path, config: dict, space: dict | None, message: str
) -> None:
    if space is not None:
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        config = {**config, "search": {"space": str(tmp_path / "space.yaml")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = run("search", "--config", "c.yaml", "--root", "mlruns", "--no-tracking", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("autolayer: error:") and message in done.stderr
    assert "HEAVY []" in done.stdout  # no torch, transformers, datasets or lightning yet
    assert not (tmp_path / "mlruns").exists()  # nothing written


CLUSTER = Path(__file__).resolve().parents[1] / "examples" / "cluster"


def _autolayer_commands(text: str) -> list[list[str]]:
    """The autolayer command lines of a job script, continuation lines joined, as argv."""
    import shlex

    joined = text.replace("\\\n", " ")
    if text.lstrip().startswith("#") and "apiVersion" in text:  # a Kubernetes manifest
        containers = yaml.safe_load(text)["spec"]["template"]["spec"]["containers"]
        joined = "\n".join(arg for c in containers for arg in c["args"])
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line.split("#", 1)[0]) if "autolayer" in line else []
        for marker in ("autolayer", "autolayer.cli"):
            if marker in words and not line.lstrip().startswith("#"):
                commands.append(words[words.index(marker) + 1 :])
    return commands


@pytest.mark.parametrize("name", ["search.sbatch", "train.sbatch", "search-job.yaml"])
def test_the_cluster_recipes_use_flags_that_exist(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from autolayer.cli import apply_overrides, build_parser
    from autolayer.cli_train import apply_train_overrides
    from autolayer.config import Config

    for var, value in {"SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "8",
                       "JOB_COMPLETION_INDEX": "3", "AUTOLAYER_STORAGE": "postgresql://db/x",
                       "MLFLOW_TRACKING_URI": "http://mlflow:5000"}.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    commands = _autolayer_commands((CLUSTER / name).read_text())
    assert commands, name
    for argv in commands:
        args = build_parser().parse_args([os.path.expandvars(a) for a in argv])
        if args.command == "search":
            config = apply_overrides(Config(), args)
            assert config.search.study_name == "my-model-my-task"
            assert config.search.seed == 3  # each worker's own sampler seed
        else:
            config = apply_train_overrides(Config(), args)
            assert args.study_name == "my-model-my-task"
        assert config.search.storage == "postgresql://db/x"
        assert (config.tracking.tracking_uri or "").startswith("http://mlflow")


def test_every_config_key_is_an_option_validated_like_the_file(tmp_path: Path) -> None:
    """`--proxy.lr 3e-4` and friends, generated from the schema: applied over the file, read as
    YAML reads a value, refused in one sentence as a bad file value would be."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"proxy": {"lr": 0.001, "steps": 7}}))
    shown = run("config", "--config", "c.yaml", "--proxy.lr", "3e-4", "--search.seeds", "1",
                "--task.reward_weights", "[1, 0.5]", cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    values, section = {}, ""
    for line in shown.stdout.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
            continue
        key, _, rest = line.strip().partition(":")
        values[f"{section}.{key}"] = rest.split("#")[0].strip()
    assert (values["proxy.lr"], values["proxy.steps"], values["search.seeds"]) == (
        "0.0003",
        "7",
        "1",
    )
    assert values["task.reward_weights"] == "[1.0, 0.5]" and values["train.lr"] == "null"
    bad = run("search", "--config", "c.yaml", "--proxy.lr", "-1", "--root", "mlruns",
              cwd=tmp_path)  # fmt: skip
    assert (
        bad.returncode == 2 and bad.stderr.strip() == "autolayer: error: proxy.lr must be positive"
    )
    assert "HEAVY []" in bad.stdout and not (tmp_path / "mlruns").exists()
    help_text = run("search", "--help", cwd=tmp_path).stdout
    assert "--proxy.full_lr VALUE" in help_text and "--train.output_dir VALUE" in help_text


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_command_is_one_sentence_and_128_plus_its_number(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
    signum: int,
    code: int,
) -> None:
    """A real signal, delivered to this process while a command runs (the search's trial
    bookkeeping on an interrupt is tested in tests/test_search.py and tests/test_interrupts.py)."""
    from autolayer import cli

    def signalled(args: object) -> int:
        # Without main's handler SIGINT would raise KeyboardInterrupt, which main also turns into
        # this sentence, but a trial only catches Interrupted: check the handler is main's.
        assert signal.getsignal(signum) is cli._raise_interrupted
        signal.raise_signal(signum)  # the handler runs before this call returns
        raise AssertionError("the signal did not interrupt the command")

    monkeypatch.setattr(cli, "cmd_config", signalled)
    assert cli.main(["config"]) == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert err == f"autolayer: interrupted by {name}; nothing was left half-written\n"


def _empty_prompt(tmp_path: Path) -> dict:
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    rows[3]["prompt"] = ""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"task": {"name": "mine", "data_files": str(tmp_path / "d.jsonl"),
                     "reward_funcs": ["autolayer.organism.reward_correct"]}}  # fmt: skip


def _latin1(tmp_path: Path) -> dict:
    rows = [json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}).encode() for i in range(8)]
    rows[5] = b'{"prompt": "caf\xe9 5+5=", "answer": "10"}'
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    return {"task": {"name": "mine", "data_files": str(tmp_path / "d.jsonl"),
                     "reward_funcs": ["autolayer.organism.reward_correct"]}}  # fmt: skip


def _no_reward(tmp_path: Path) -> dict:
    (tmp_path / "r.py").write_text(
        "def never(completions, **kw):\n    return [None] * len(completions)\n"
    )
    return {"task": {"reward_funcs": [f"{tmp_path / 'r.py'}:never"]}}


def _truncated_weights(tmp_path: Path) -> dict:
    from tests.conftest import save_organism_shaped

    path = save_organism_shaped(tmp_path / "model")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return {"model": {"name": str(path)}}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_empty_prompt, "data are empty; remove those rows"),
        (_latin1, "is not valid UTF-8 text"),
        (_no_reward, "returned None or NaN for all 4 completions"),
        (_truncated_weights, "its weights file is corrupt or truncated"),
    ],
    ids=["empty prompt", "not UTF-8", "reward never a number", "truncated weights"],
)
def test_bad_data_rewards_or_weights_are_one_sentence_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
    make: Any,
    message: str,
) -> None:
    """Checked before the storage or the tracking store opens: no empty journal.log, no
    mlflow.db, no study to resume by mistake."""
    from autolayer.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"proxy": {"device": "cpu"}, **make(tmp_path)}))
    root = tmp_path / "mlruns"
    assert main(["search", "--config", str(tmp_path / "c.yaml"), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolayer: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not root.exists()
