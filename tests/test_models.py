import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from autolayer.errors import AutolayerError
from autolayer.layers import middle_layers, parse_layers, validate_layers
from autolayer.models import (
    describe_layers,
    find_layer_stack,
    freeze_except,
    layer_param_names,
)

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# (config, expected stack path): each architecture built from a tiny config, random weights.
ARCHITECTURES = {
    "qwen2": (lambda: tf.Qwen2Config(**TINY), "model.layers"),
    "qwen3": (lambda: tf.Qwen3Config(**TINY, head_dim=8), "model.layers"),
    "llama": (lambda: tf.LlamaConfig(**TINY), "model.layers"),
    "mistral": (lambda: tf.MistralConfig(**TINY), "model.layers"),
    "gemma2": (lambda: tf.Gemma2Config(**TINY, head_dim=8), "model.layers"),
    "gemma3": (lambda: tf.Gemma3TextConfig(**TINY, head_dim=8), "model.layers"),
    "phi3": (lambda: tf.Phi3Config(**TINY, pad_token_id=0), "model.layers"),
    "olmo2": (lambda: tf.Olmo2Config(**TINY), "model.layers"),
    "gpt2": (
        lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64),
        "transformer.h",
    ),
    "gpt_neox": (
        lambda: tf.GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "gpt_neox.layers",
    ),
}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(ARCHITECTURES[arch][0]())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_find_layer_stack_on_every_supported_architecture(arch: str) -> None:
    model = build(arch)
    stack = find_layer_stack(model)
    assert stack.path == ARCHITECTURES[arch][1]
    assert len(stack) == 4


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_freeze_except_trains_exactly_the_chosen_layers(arch: str) -> None:
    model = build(arch)
    stack = find_layer_stack(model)
    names = freeze_except(model, [1, 2])
    expected = sum(p.numel() for i in (1, 2) for p in stack.layers[i].parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == names
    assert sum(p.numel() for _, p in trainable) == expected
    assert all(n.startswith((stack.prefix(1), stack.prefix(2))) for n in names)
    # embeddings and the (possibly tied) LM head stay frozen
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_layer_prefix_does_not_match_layer_ten() -> None:
    config = tf.Qwen3Config(**{**TINY, "num_hidden_layers": 12}, head_dim=8)
    model = tf.AutoModelForCausalLM.from_config(config)
    names = layer_param_names(model, [1])
    assert names and all(n.startswith("model.layers.1.") for n in names)


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ([], "empty"),
        ([4], "out of range"),
        ([-1], "out of range"),
        ([1, 1], "more than once"),
        ([1.5], "not an integer"),
        (["2"], "not an integer"),
        ([True], "not an integer"),
    ],
)
def test_bad_selections_name_the_valid_range(selection: list, message: str) -> None:
    with pytest.raises(AutolayerError, match=message) as err:
        validate_layers(selection, 4)
    assert "valid layers are 0..3" in str(err.value)


def test_parse_layers() -> None:
    assert parse_layers("3, 1", 8) == (1, 3)
    assert parse_layers("2-4,7", 8) == (2, 3, 4, 7)
    assert parse_layers("all", 3) == (0, 1, 2)
    with pytest.raises(AutolayerError, match="cannot read"):
        parse_layers("a,b", 8)


def test_middle_layers_matches_the_paper_formula() -> None:
    # L=28, k=4: [floor(14-2), floor(14+2)) = [12, 16)
    assert middle_layers(28, 4) == (12, 13, 14, 15)
    assert middle_layers(8, 1) == (3,)


def test_describe_layers_counts_every_parameter_once() -> None:
    model = build("qwen3")
    infos, rest = describe_layers(model)
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert [i.middle_third for i in infos] == [False, True, True, False]
    assert sum(i.num_params for i in infos) + rest == sum(p.numel() for p in model.parameters())


def test_a_model_directory_without_a_tokenizer_is_one_sentence(tmp_path: Path) -> None:
    from autolayer.models import load_model
    from tests.conftest import save_organism_shaped

    path = save_organism_shaped(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(AutolayerError, match="cannot load a tokenizer for model .* save one"):
        load_model(str(path), device="cpu")


def _truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a download cut short


def _garble_header(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # the header length: garbage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "its weights file is corrupt or truncated .*incomplete metadata"),
        (_garble_header, "its weights file is corrupt or truncated .*header too large"),
        (
            lambda path: (path / "config.json").write_text('{"model_type": "qwen3",'),
            "config.json' is not a valid JSON file",
        ),
    ],
)
def test_a_corrupt_model_file_is_one_sentence_that_names_it(
    tmp_path: Path, damage: Any, message: str
) -> None:
    from autolayer.models import load_model
    from tests.conftest import save_organism_shaped

    path = save_organism_shaped(tmp_path / "m")
    damage(path)
    with pytest.raises(AutolayerError, match=f"cannot load model '{path}': .*{message}") as err:
        load_model(str(path), device="cpu")
    assert "tokenizer" not in str(err.value)


# ---------------------------------------------------------------- the meta skeleton

SKELETONS = [
    "llama", "mistral", "phi3", "olmo2", "granite", "falcon", "qwen2", "qwen3", "gemma",
    "gemma2", "gpt2", "gpt_neox", "stablelm",
]  # fmt: skip


def _tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, n_embd=64, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    if model_type != "falcon":  # Falcon derives head_dim and has no key-value head count here
        kwargs.update(num_key_value_heads=2, head_dim=16)
    return AutoConfig.for_model(model_type, **kwargs)


@pytest.mark.parametrize("model_type", SKELETONS)
def test_layers_reads_only_the_config_and_counts_exactly(
    model_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`autolayer layers` on a directory holding config.json alone: no weights, no tokenizer."""
    from transformers import AutoModelForCausalLM

    from autolayer.cli import main

    config = _tiny_config(model_type)
    config.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    real = AutoModelForCausalLM.from_config(config)  # random init: the counts to match
    stack = find_layer_stack(real)
    start = time.perf_counter()
    assert main(["layers", str(tmp_path), "--json"]) == 0
    seconds = time.perf_counter() - start
    shown = json.loads(capsys.readouterr().out)
    per_layer = [sum(p.numel() for p in block.parameters()) for block in stack.layers]
    assert [row["num_params"] for row in shown["layers"]] == per_layer
    total = sum(p.numel() for p in real.parameters())
    assert shown["frozen_rest_params"] == total - sum(per_layer)
    assert shown["stack_path"] == stack.path
    assert seconds < 3.0


def test_a_70b_config_lists_in_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Llama-3-70B's shape: reading its 140 GB of weights would take minutes; the skeleton not."""
    from transformers import AutoConfig

    from autolayer.cli import main

    AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    ).save_pretrained(tmp_path)  # fmt: skip
    start = time.perf_counter()
    assert main(["layers", str(tmp_path), "--json"]) == 0
    assert time.perf_counter() - start < 3.0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["layers"]) == 80
    # q and o 8192^2, k and v 8192x1024, MLP 3 x 8192x28672, two RMSNorms of 8192
    assert shown["layers"][0]["num_params"] == 855_654_400


# ---------------------------------------------------------------- threads


def test_cores_given_follows_affinity_and_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from autolayer import models

    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(models, "CPU_MAX", cpu_max)
    assert models.cores_given() == 4  # no cgroup file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert models.cores_given() == 4
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota: 2 threads
    assert models.cores_given() == 2


def test_set_threads_takes_the_setting_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autolayer.models import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_threads(None) == 1  # the user's OMP_NUM_THREADS is left alone
    finally:
        torch.set_num_threads(before)
