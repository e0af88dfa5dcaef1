"""The agent organism end to end: GiGPO on one layer, a layer search, and training its pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from autolayer.agent_organism import organism_path
from autolayer.cli import main
from autolayer.config import ProxyConfig, TaskConfig, load_config
from autolayer.loading import Workload
from autolayer.models import load_model
from autolayer.proxy import run_proxy
from autolayer.runner import run_search
from autolayer.scoring import evaluate
from autolayer.study import TrialRecord
from autolayer.tasks import load_task
from autolayer.train import run_training, select_layers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def agent() -> tuple[Any, Any]:
    return load_model("agent_organism", device="cpu")


def test_the_packaged_agent_is_a_small_qwen3(agent: tuple[Any, Any]) -> None:
    model, _ = agent
    assert len(model.model.layers) == 8 and sum(p.numel() for p in model.parameters()) < 2e6
    assert (organism_path() / "README.md").is_file()


def test_gigpo_on_one_layer_beats_the_base_by_three_standard_errors(
    agent: tuple[Any, Any],
) -> None:
    _, tokenizer = agent
    model = AutoModelForCausalLM.from_pretrained(organism_path())
    task = load_task(TaskConfig(name="gridworld"), tokenizer)
    base = evaluate(model, tokenizer, task)
    assert 0.3 <= base.score <= 0.8  # the demonstrator's flaw leaves headroom
    config = ProxyConfig(
        algorithm="gigpo", steps=20, prompts_per_step=16, num_generations=8, lr=1e-3,
        eval_every=20, device="cpu",
    )  # fmt: skip
    embeddings = model.model.embed_tokens.weight.clone()
    result = run_proxy(Workload(model, tokenizer, task), config, [4])
    assert result.score - base.score >= 3 * base.stderr, (base.score, result.score)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_the_example_search_picks_a_layer_and_train_beats_the_base(tmp_path: Path) -> None:
    """examples/agent.yaml, two candidates: search, then train the pick for real."""
    config = load_config(EXAMPLES / "agent.yaml")
    config.search.n_trials = 2  # the warm start: the two middle layers
    config.tracking.enabled = False
    config.train.steps = 20
    ctx = run_search(config, root=tmp_path / "mlruns")
    assert len(ctx.study.trials) == 2
    layers = select_layers(ctx.study, "only", 1, 8)
    result = run_training(
        config, layers, "only", study=ctx.study, root=tmp_path / "mlruns", out_dir=tmp_path / "out"
    )
    assert result.after.score - result.before.score >= 3 * result.before.stderr
    assert result.trainable_params == 61_600 and (tmp_path / "out" / "delta").is_dir()


def test_a_user_environment_runs_a_search_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main_in_process: None
) -> None:
    code = main(["search", "--config", str(EXAMPLES / "agent_env" / "task.yaml"), "--root",
                 str(tmp_path / "mlruns"), "--n-trials", "1", "--no-tracking"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "agent-organism-corridor-single_layer" in out and "★ best" in out


def test_a_broken_environment_fails_its_trial_not_the_study(tmp_path: Path) -> None:
    """An environment that breaks mid-search fails that trial with its sentence; the next runs."""
    from optuna.trial import TrialState

    from autolayer.agent_organism import GridWorld
    from autolayer.config import config_from_dict
    from autolayer.search import SearchHooks

    armed = {"on": False}

    class Fragile(GridWorld):
        def step(self, action: str) -> Any:
            if armed["on"]:
                return "broken", None, False, {}
            return super().step(action)

    task = load_task(TaskConfig(name="gridworld", eval_size=8, train_size=64))
    task = type(task)(**{**task.__dict__, "env": Fragile})
    config = config_from_dict(
        {
            "model": {"name": "agent_organism"},
            "proxy": {"algorithm": "gigpo", "steps": 1, "prompts_per_step": 2,
                      "num_generations": 2, "device": "cpu"},
            "search": {"space": "single_layer", "n_trials": 2, "pruner": "none"},
            "tracking": {"enabled": False},
        }
    )  # fmt: skip
    hooks = SearchHooks(on_trial_start=lambda number, _: armed.update(on=number == 0))
    ctx = run_search(config, root=tmp_path / "mlruns", hooks=hooks, task=task)
    assert [t.state for t in ctx.study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    reason = TrialRecord.of(ctx.study.trials[0]).fail_reason or ""
    assert reason == "EnvError: environment 'Fragile' step returned the reward None"
