"""Bring your own task: a local dataset and TRL-signature rewards run search and train unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import optuna
import pytest
from optuna.trial import TrialState

from autolayer import organism
from autolayer.cli import main
from autolayer.config import config_from_dict
from autolayer.runner import run_search
from autolayer.storage import make_storage
from autolayer.study import TrialRecord
from autolayer.tasks import Task
from autolayer.train import run_training

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "byo_task" / "task.yaml"


def test_the_example_task_runs_search_and_train_from_the_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
) -> None:
    """The README's bring-your-own-task example, run from another directory (in-process
    `main`, as the console script calls it)."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "mlruns")
    code = main(["search", "--config", str(EXAMPLE), "--root", root, "--n-trials", "1",
                 "--no-tracking"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "organism-subtraction-single_layer" in out
    assert "★ best" in out
    trained = tmp_path / "trained"
    code = main(["train", "--config", str(EXAMPLE), "--study-name",
                 "organism-subtraction-single_layer", "--root", root, "--out", str(trained),
                 "--steps", "2", "--no-tracking"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["task"] == "subtraction" and summary["eval_prompts"] == 200
    assert (trained / "model" / "config.json").is_file() and (trained / "delta").is_dir()


@pytest.mark.parametrize(
    ("yaml_task", "message"),
    [
        ("name: mine\n  data_files: missing.csv\n  reward_funcs: [r.py:one]",
         "task data file missing.csv does not exist"),
        ("name: mine\n  data_files: d.csv\n  reward_funcs: [r.py:nope]", "has no callable 'nope'"),
        ("name: mine\n  data_files: d.csv\n  reward_funcs: [r.py:two]", "TRL's reward signature"),
        ("name: mine\n  data_files: d.csv\n  prompt_column: q\n  reward_funcs: [r.py:one]",
         "has no 'q' column"),
        ("name: mine\n  dataset: ./nowhere/data\n  reward_funcs: [r.py:one]",
         "task data ./nowhere/data does not exist"),
    ],
)  # fmt: skip
def test_bad_task_input_exits_2_with_one_sentence(
    tmp_path: Path,
    yaml_task: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    main_in_process: None,
) -> None:
    """In-process `main`, as the console script calls it (one real process: the example above)."""
    (tmp_path / "d.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n3+3=,6\n")
    (tmp_path / "r.py").write_text(
        "def one(completions, **kw):\n    return [0.0] * len(completions)\n\n"
        "def two(completions):\n    return [0.0] * len(completions)\n"
    )
    (tmp_path / "c.yaml").write_text(f"task:\n  {yaml_task}\n")
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--config", "c.yaml", "--root", "mlruns", "--no-tracking"])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autolayer: error:")
    assert re.search(message, lines[0]), lines[0]
    storage = make_storage(None, tmp_path / "mlruns")
    assert optuna.get_all_study_names(storage) == []  # no study was started
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def closeness(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """A dense reward: 1 - |error| / 100 for a numeric answer, None for junk."""
    out: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        out.append(max(0.0, 1 - abs(int(c) - int(a)) / 100) if c.strip().isdigit() else None)
    return out  # type: ignore[return-value]


def test_a_python_task_object_runs_search_and_train(tmp_path: Path) -> None:
    rows = organism.make_rows("train", 64, 0)
    held_out = organism.make_rows("eval", 32, 0)
    task = Task(
        name="closeness",
        train=datasets.Dataset.from_list(rows),
        eval=datasets.Dataset.from_list(held_out),
        reward_funcs=(closeness, organism.reward_correct),
        reward_weights=(0.5, 1.0),
        max_completion_length=4,
    )
    config = config_from_dict(
        {
            "proxy": {"steps": 2, "prompts_per_step": 4, "num_generations": 2, "device": "cpu"},
            "search": {"space": "single_layer", "n_trials": 1, "pruner": "none"},
            "tracking": {"enabled": False},
            "train": {"steps": 1},
        }
    )
    ctx = run_search(config, root=tmp_path / "mlruns", task=task)
    assert ctx.study.study_name == "organism-closeness-single_layer"
    done = ctx.study.get_trials(states=(TrialState.COMPLETE,))
    outcomes = TrialRecord.of(done[0]).outcomes or ()
    assert len(done) == 1 and len(outcomes) == 32
    # weighted: every outcome is 0.5 x closeness (or 0 for junk) + 1 x exact
    assert all(0.0 <= v <= 1.5 for v in outcomes)
    result = run_training(
        config, [4], "only", root=tmp_path / "mlruns", out_dir=tmp_path / "out", task=task
    )
    assert len(result.after.outcomes) == 32 and result.trainable_params == 61_600


def test_a_reward_that_raises_mid_trial_fails_that_trial_only(tmp_path: Path) -> None:
    from autolayer.search import SearchHooks

    armed = {"on": False}

    def flaky(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
        if armed["on"]:
            armed["on"] = False
            raise RuntimeError("boom")
        return organism.reward_correct(completions, answer)

    task = Task(
        name="flaky",
        train=datasets.Dataset.from_list(organism.make_rows("train", 32, 0)),
        eval=datasets.Dataset.from_list(organism.make_rows("eval", 16, 0)),
        reward_funcs=(flaky,),
        max_completion_length=4,
    )
    config = config_from_dict(
        {
            "proxy": {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "device": "cpu"},
            "search": {"space": "single_layer", "n_trials": 2, "pruner": "none"},
            "tracking": {"enabled": False},
        }
    )
    hooks = SearchHooks(on_trial_start=lambda number, _: armed.update(on=number == 0))
    ctx = run_search(config, root=tmp_path / "mlruns", hooks=hooks, task=task)
    states = [t.state for t in ctx.study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    reason = TrialRecord.of(ctx.study.trials[0]).fail_reason or ""
    assert reason == "RewardError: reward function 'flaky' raised RuntimeError: boom"


def test_humaneval_runs_through_the_same_path(tmp_path: Path) -> None:
    """HumanEval's real problems through the proxy and the sandboxed reward, on a tiny model."""
    from autolayer.measure import measure

    config = config_from_dict(
        {
            "model": {"name": "code_organism"},
            "task": {"name": "humaneval", "train_size": 4, "eval_size": 6,
                     "max_completion_length": 6},
            "proxy": {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "device": "cpu"},
        }
    )  # fmt: skip
    result = measure(config, [4], with_full=False, root=tmp_path)
    assert len(result.base.outcomes) == len(result.subset.final.outcomes) == 6
    assert result.subset.steps == 1
