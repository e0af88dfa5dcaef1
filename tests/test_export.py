import copy
import json
import re
import shlex

import peft
import pytest
import torch
import transformers as tf
import yaml
from transformers.pytorch_utils import Conv1D

from autolayer.errors import AutolayerError
from autolayer.export import (
    FILENAMES,
    FORMATS,
    LayerChoice,
    axolotl_config,
    axolotl_match,
    axolotl_patterns,
    choice_from_json,
    choice_from_model,
    choice_json,
    linear_module_names,
    llamafactory_config,
    llamafactory_trainable_layers,
    load_choice,
    nearest_llamafactory_set,
    peft_config,
    render,
    swift_command,
    swift_regex,
    trl_script,
    write_export,
)
from tests.conftest import tiny_qwen3

QWEN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qwen3(num_layers: int) -> torch.nn.Module:
    return tiny_qwen3(num_layers)


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=32,
        n_embd=16,
        n_layer=4,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def qwen8() -> torch.nn.Module:
    return qwen3(8)


@pytest.fixture(scope="module")
def qwen28() -> torch.nn.Module:
    return qwen3(28)


def names_of(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_choice_from_model_records_names_counts_and_linears(qwen8: torch.nn.Module) -> None:
    choice = choice_from_model(qwen8, "tiny/qwen3", [5, 2], revision="abc", learning_rate=3e-6)
    assert choice.layers == (2, 5)
    assert choice.stack_path == "model.layers" and choice.num_layers == 8
    assert all(n.startswith(("model.layers.2.", "model.layers.5.")) for n in choice.param_names)
    blocks = [qwen8.get_submodule(f"model.layers.{i}") for i in (2, 5)]
    expected = sum(p.numel() for block in blocks for p in block.parameters())
    assert choice.param_count == expected
    assert choice.total_params == sum(p.numel() for p in qwen8.parameters())
    assert choice.linear_modules == QWEN_LINEARS
    assert linear_module_names(gpt2(), [0]) == ("c_attn", "c_proj", "c_fc")


# ---- json ----


def test_json_round_trips(qwen8: torch.nn.Module, tmp_path) -> None:
    evidence = {"study": "s1", "scores": {"3": [0.12, 0.05, 0.19]}, "objective": "reward"}
    choice = choice_from_model(qwen8, "tiny", [3], evidence=evidence, algorithm="dr_grpo")
    text = choice_json(choice)
    record = json.loads(text)
    assert record["format_version"] == 1
    assert list(record) == sorted(record)
    assert choice_from_json(text) == choice
    (path,) = write_export(choice, "json", tmp_path)
    assert load_choice(path) == choice


def test_json_refuses_other_versions_and_junk() -> None:
    with pytest.raises(AutolayerError, match="format version"):
        choice_from_json('{"format_version": 99}')
    with pytest.raises(AutolayerError, match="not valid JSON"):
        choice_from_json("{")
    with pytest.raises(AutolayerError, match="does not describe"):
        choice_from_json('{"format_version": 1, "model": "x"}')


# ---- Axolotl ----


def test_axolotl_match_mirrors_their_escaping() -> None:
    # the documented trap: without a trailing dot, layer 1 also matches layers 10-19
    assert axolotl_match("model.layers.1", "model.layers.12.mlp.up_proj.weight")
    assert not axolotl_match("^model.layers.1.", "model.layers.12.mlp.up_proj.weight")
    # '.' before '+' stays a wildcard; other dots are literal; anchored at the start only
    assert axolotl_match("model.+mlp", "model.layers.3.mlp.up_proj.weight")
    assert not axolotl_match("model.layers", "modelxlayers.3.mlp.weight")
    assert not axolotl_match("layers.3.", "model.layers.3.mlp.weight")


@pytest.mark.parametrize("layers", [(1,), (1, 10, 19), (0, 27)])
def test_axolotl_patterns_select_exactly_the_chosen_layers(qwen28, layers) -> None:
    choice = choice_from_model(qwen28, "tiny", layers)
    patterns = axolotl_patterns(choice)
    matched = {n for n in names_of(qwen28) if any(axolotl_match(p, n) for p in patterns)}
    assert matched == set(choice.param_names)
    layer1 = [n for n in names_of(qwen28) if re.match(r"model\.layers\.1\d\.", n)]
    assert len(layer1) > 0
    assert not any(axolotl_match("^model.layers.1.", n) for n in layer1)


def test_axolotl_yaml_loads_with_the_keys_axolotl_reads(qwen8) -> None:
    choice = choice_from_model(qwen8, "org/model", [3, 4], revision="r1", learning_rate=1e-6)
    text = axolotl_config(choice)
    data = yaml.safe_load(text)
    assert data["unfrozen_parameters"] == ["^model.layers.3.", "^model.layers.4."]
    assert data["base_model"] == "org/model" and data["revision_of_model"] == "r1"
    assert data["rl"] == "grpo" and data["learning_rate"] == 1e-6
    assert data["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert "peft_layers_to_transform" in text  # the incompatibility is spelled out


# ---- PEFT ----


def lora_sites(model: torch.nn.Module, stack: str) -> set[tuple[int, str]]:
    """(layer, in-block module path) of every module PEFT gave a lora_A."""
    sites = set()
    pattern = re.compile(rf"(?:.*\.)?{re.escape(stack)}\.(\d+)\.(.+)\.lora_A$")
    for name, _ in model.named_modules():
        if name.endswith("lora_A"):
            found = pattern.match(name)
            assert found, f"LoRA outside the layer stack: {name}"
            sites.add((int(found.group(1)), found.group(2)))
    return sites


def linear_paths(block: torch.nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@pytest.mark.parametrize(
    ("build", "layers", "stack", "pattern"),
    [
        (lambda: qwen3(8), (2, 5), "model.layers", "layers"),
        (lambda: qwen3(28), (1, 10, 27), "model.layers", "layers"),
        (gpt2, (1, 3), "transformer.h", "h"),
    ],
)
def test_peft_config_puts_lora_on_every_linear_of_exactly_the_chosen_layers(
    build, layers, stack, pattern
) -> None:
    model = build()
    choice = choice_from_model(model, "tiny", layers)
    data = json.loads(peft_config(choice))
    assert isinstance(data["target_modules"], list)  # a string would skip layers_to_transform
    assert data["layers_pattern"] == pattern and data["layers_to_transform"] == list(layers)
    block_linears = linear_paths(model.get_submodule(f"{stack}.0"))
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**data))
    assert lora_sites(wrapped, stack) == {(i, path) for i in layers for path in block_linears}


def test_peft_config_needs_linear_modules(qwen8) -> None:
    choice = choice_from_model(qwen8, "tiny", [1])
    bare = LayerChoice(**{**choice.__dict__, "linear_modules": ()})
    with pytest.raises(AutolayerError, match="no linear modules"):
        peft_config(bare)


# ---- LLaMA-Factory ----


def llamafactory_trainable(names: list[str], freeze_trainable_layers: int, num_layers: int):
    """LLaMA-Factory's `_setup_freeze_tuning` with freeze_trainable_modules=all, on names."""
    n = freeze_trainable_layers
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    return {name for name in names if any(f".{i:d}." in name for i in ids)}


@pytest.mark.parametrize(
    ("layers", "expected"), [((5, 6, 7), 3), ((0, 1), -2), ((7,), 1), (tuple(range(8)), 8)]
)
def test_llamafactory_writes_last_n_positive_and_first_n_negative(qwen8, layers, expected):
    choice = choice_from_model(qwen8, "org/model", layers)
    data = yaml.safe_load(llamafactory_config(choice))
    assert data["finetuning_type"] == "freeze"
    assert data["freeze_trainable_layers"] == expected
    assert data["freeze_trainable_modules"] == "all"
    assert llamafactory_trainable(names_of(qwen8), expected, 8) == set(choice.param_names)


def test_llamafactory_last_n_on_28_layers_matches_their_rule(qwen28) -> None:
    choice = choice_from_model(qwen28, "org/model", range(24, 28))
    n = yaml.safe_load(llamafactory_config(choice))["freeze_trainable_layers"]
    assert n == 4
    assert llamafactory_trainable(names_of(qwen28), n, 28) == set(choice.param_names)


def test_llamafactory_refuses_other_sets_naming_the_nearest(qwen8, tmp_path) -> None:
    choice = choice_from_model(qwen8, "org/model", [2, 5])
    with pytest.raises(AutolayerError, match=r"first or last N.*layers 2-7 \(6 layers\)"):
        llamafactory_config(choice)
    with pytest.raises(AutolayerError):
        write_export(choice, "llamafactory", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layers", "num_layers", "nearest"),
    [
        ((6,), 8, (6, 7)),  # last 2 beats first 7
        ((1,), 8, (0, 1)),  # first 2 beats last 7
        ((1, 3), 28, (0, 1, 2, 3)),
        ((20, 25), 28, tuple(range(20, 28))),
        ((2, 5), 8, (2, 3, 4, 5, 6, 7)),  # tie (6 each): last N, LLaMA-Factory's positive form
        ((0, 7), 8, tuple(range(8))),
    ],
)
def test_nearest_llamafactory_set(layers, num_layers, nearest) -> None:
    assert nearest_llamafactory_set(layers, num_layers) == nearest
    assert llamafactory_trainable_layers(nearest, num_layers) is not None


def test_llamafactory_refuses_when_nested_indices_would_train_other_layers() -> None:
    # an MoE block: '.3.' in experts.3 would make LLaMA-Factory train expert 3 of every layer
    choice = LayerChoice(
        model="m",
        revision=None,
        num_layers=4,
        stack_path="model.layers",
        layers=(2, 3),
        param_names=("model.layers.2.mlp.experts.3.up.weight", "model.layers.3.attn.q.weight"),
        param_count=2,
        total_params=10,
        evidence={},
    )
    with pytest.raises(AutolayerError, match="every layer"):
        llamafactory_config(choice)


# ---- ms-swift ----


@pytest.mark.parametrize("layers", [(1,), (1, 10, 19), (0, 13, 27)])
def test_swift_regex_matches_exactly_the_chosen_params(qwen28, layers) -> None:
    choice = choice_from_model(qwen28, "tiny", layers)
    regex = swift_regex(choice)
    names = names_of(qwen28)
    assert {n for n in names if re.search(regex, n)} == set(choice.param_names)
    assert {n for n in names if re.fullmatch(regex, n)} == set(choice.param_names)


def test_swift_command_freezes_everything_then_reenables_the_regex(qwen28) -> None:
    choice = choice_from_model(qwen28, "org/model", [3, 17], revision="r1", learning_rate=2e-6)
    args = shlex.split(swift_command(choice).split("set -euo pipefail\n", 1)[1].replace("\\\n", ""))
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert args[:2] == ["swift", "rlhf"] and flags["--rlhf_type"] == "grpo"
    assert flags["--tuner_type"] == "full" and flags["--freeze_parameters_ratio"] == "1"
    assert flags["--model_revision"] == "r1" and flags["--learning_rate"] == "2e-06"
    # ms-swift: all trainable, ratio 1 freezes all, then activate_parameters uses re.search
    trainable = {n for n in names_of(qwen28) if re.search(flags["--trainable_parameters_regex"], n)}
    assert trainable == set(choice.param_names)


# ---- TRL ----


def test_trl_script_compiles_and_its_freeze_trains_exactly_the_choice(qwen28) -> None:
    choice = choice_from_model(qwen28, 'odd "name"', [1, 10], revision="r1", learning_rate=5e-7)
    text = trl_script(choice)
    namespace: dict = {"__name__": "exported_trl_script"}  # not __main__: main() must not run
    exec(compile(text, "train_grpo.py", "exec"), namespace)
    assert namespace["MODEL"] == 'odd "name"' and namespace["REVISION"] == "r1"
    assert namespace["LEARNING_RATE"] == 5e-7 and namespace["LOSS_TYPE"] == "grpo"
    model = copy.deepcopy(qwen28)
    count = namespace["freeze_all_but_chosen_layers"](model)
    assert count == choice.param_count
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(choice.param_names)
    with pytest.raises(SystemExit, match="expected"):
        namespace["freeze_all_but_chosen_layers"](model, expected=choice.param_count + 1)


def test_trl_script_defaults_and_dr_grpo(qwen8) -> None:
    choice = choice_from_model(qwen8, "tiny", [4], algorithm="dr_grpo")
    namespace: dict = {"__name__": "exported_trl_script"}
    exec(compile(trl_script(choice), "train_grpo.py", "exec"), namespace)
    assert namespace["LEARNING_RATE"] == 1e-6 and namespace["SCALE_REWARDS"] == "none"
    assert "GRPOTrainer(" in trl_script(choice) and "use_reentrant" in trl_script(choice)


# ---- writing ----


def test_write_export_writes_every_format_atomically(tmp_path) -> None:
    model = qwen3(8)
    choice = choice_from_model(model, "org/model", [6, 7], learning_rate=1e-6)
    for fmt in FORMATS:
        (path,) = write_export(choice, fmt, tmp_path)
        assert path == tmp_path / FILENAMES[fmt]
        assert path.read_text() == render(choice, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILENAMES.values())  # no temps
    with pytest.raises(AutolayerError, match="unknown export format"):
        render(choice, "verl")
