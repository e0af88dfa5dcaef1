from pathlib import Path

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
