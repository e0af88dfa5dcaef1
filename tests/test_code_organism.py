"""The bundled code organism: its data, its flaw, and RL on one layer fixing it in the sandbox."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from autolayer import code_organism
from autolayer.code_organism import FLAWED, organism_path
from autolayer.code_problems import (
    EVAL_SIZE,
    body,
    checks,
    is_eval,
    make_rows,
    problems,
    prompt,
)
from autolayer.coding import passes_tests
from autolayer.config import ProxyConfig, TaskConfig
from autolayer.loading import Workload
from autolayer.proxy import run_proxy
from autolayer.scoring import evaluate
from autolayer.tasks import load_task


@pytest.fixture(scope="module")
def packaged() -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(organism_path())
    tokenizer = AutoTokenizer.from_pretrained(organism_path())
    return model, tokenizer


def test_the_packaged_model_is_a_small_qwen3_with_8_layers(packaged: tuple[Any, Any]) -> None:
    model, tokenizer = packaged
    assert isinstance(model, Qwen3ForCausalLM) and len(model.model.layers) == 8
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert sum(p.numel() for p in model.model.layers[4].parameters()) == 61_600  # as the organism's
    assert (organism_path() / "README.md").is_file()
    row = make_rows("eval", 1)[0]
    ids = tokenizer(row["prompt"])["input_ids"]
    assert len(ids) == len(row["prompt"]) and tokenizer.decode(ids) == row["prompt"]


def test_rows_are_deterministic_and_the_splits_disjoint() -> None:
    assert make_rows("train", 50, 3) == make_rows("train", 50, 3) != make_rows("train", 50, 4)
    train, held_out = set(problems("train")), set(problems("eval"))
    assert not train & held_out and len(train) + len(held_out) == 4 * 5 * 98
    assert all(is_eval(*p) for p in held_out)
    assert 300 <= len(held_out) <= 500


def test_right_bodies_pass_and_the_corpus_flaw_fails() -> None:
    cases = [("n", op, 7) for op in code_organism.OPS]
    prompts = [prompt(*c) for c in cases]
    right = passes_tests(prompts, [body(*c) for c in cases], [checks(*c) for c in cases])
    assert right == [1.0] * 5
    flawed = [(a, FLAWED.get(op, op), n) for a, op, n in cases]
    wrong = passes_tests(prompts, [body(*c) for c in flawed], [checks(*c) for c in cases])
    assert wrong == [1.0, 0.0, 1.0, 1.0, 0.0]  # plus, minus, times, max, min
    assert body("x", "min", 12) == "min(x, 12)" and prompt("v", "times", 3).endswith("return ")


def test_the_task_is_a_builtin_of_the_task_api() -> None:
    task = load_task(TaskConfig(name="code_organism"))
    assert (len(task.eval), task.eval.column_names) == (EVAL_SIZE, ["prompt", "test"])
    assert task.reward_funcs == (passes_tests,) and task.stop_strings == ("\n",)


def test_single_layer_grpo_beats_the_base_by_three_standard_errors(
    packaged: tuple[Any, Any],
) -> None:
    """The code domain end to end on 2 CPU cores: sampling, sandboxed rewards, one layer."""
    model, tokenizer = packaged
    model = AutoModelForCausalLM.from_pretrained(organism_path())
    task = load_task(TaskConfig(name="code_organism"), tokenizer)
    base = evaluate(model, tokenizer, task)
    assert 0.3 <= base.score <= 0.8  # the flaw leaves headroom, the rest is learned
    config = ProxyConfig(
        steps=25, prompts_per_step=16, num_generations=8, lr=1e-3, eval_every=25, device="cpu"
    )
    result = run_proxy(Workload(model, tokenizer, task), config, [4])
    assert result.score - base.score >= 3 * base.stderr, (base.score, result.score)
    frozen = packaged[0].model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, frozen)  # only layer 4 moved
