"""Turn a layer choice into each trainer's own config, keeping the exact name rules of each.

A `LayerChoice` records which decoder layers to train and why; its canonical form is the `json`
format. Each other format is a pure function `LayerChoice -> str` whose output a user pastes into
that tool. Where a tool selects parameters by a name rule, the rule is mirrored here
(`axolotl_match`, `swift_regex`, the TRL script's freeze function, LLaMA-Factory's first/last N) so
the tests can prove the emitted text selects exactly the chosen parameters and nothing else.
`write_export` writes the text atomically.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from autolayer.errors import AutolayerError
from autolayer.files import write_text_atomic
from autolayer.layers import validate_layers
from autolayer.models import find_layer_stack, layer_param_names

FORMAT_VERSION = 1  # of the json record; bump when a field changes meaning
FORMATS = ("json", "axolotl", "peft", "llamafactory", "swift", "trl")
FILENAMES = {
    "json": "layer_choice.json",
    "axolotl": "axolotl.yaml",
    "peft": "lora_config.json",
    "llamafactory": "llamafactory.yaml",
    "swift": "swift_grpo.sh",
    "trl": "train_grpo.py",
}
_EXECUTABLE = {"swift", "trl"}
_STACK_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class LayerChoice:
    """Which decoder layers of which model to train, and the evidence for them."""

    model: str  # hub id or path as the user gave it
    revision: str | None
    num_layers: int
    stack_path: str  # the layer ModuleList's name, e.g. `model.layers` (see find_layer_stack)
    layers: tuple[int, ...]
    param_names: tuple[str, ...]  # full named_parameters() names of the chosen layers
    param_count: int
    total_params: int
    evidence: dict[str, Any]  # scores, contributions with CIs and how they were obtained
    learning_rate: float | None = None
    algorithm: str = "grpo"  # TRL loss_type: grpo or dr_grpo
    # leaf names of the nn.Linear / Conv1D modules inside one chosen block (LoRA targets)
    linear_modules: tuple[str, ...] = field(default=())

    def prefixes(self) -> tuple[str, ...]:
        """The `named_parameters()` prefix of each chosen layer, trailing dot included."""
        return tuple(f"{self.stack_path}.{layer}." for layer in self.layers)


def linear_module_names(model: nn.Module, layers: Sequence[int]) -> tuple[str, ...]:
    """Leaf names of the linear modules (nn.Linear, GPT-2's Conv1D) in the given blocks, in order.

    These are what LoRA can wrap: `q_proj ... down_proj` for Llama/Qwen, `c_attn, c_proj, c_fc` for
    GPT-2. Read from the model, so any architecture's naming works without a table.
    """
    from transformers.pytorch_utils import Conv1D

    stack = find_layer_stack(model)
    names: dict[str, None] = {}  # an ordered set
    for layer in validate_layers(layers, len(stack)):
        for path, module in stack.layers[layer].named_modules():
            if path and isinstance(module, (nn.Linear, Conv1D)):
                names[path.rsplit(".", 1)[-1]] = None
    return tuple(names)


def choice_from_model(
    model: nn.Module,
    model_name: str,
    layers: Iterable[int],
    revision: str | None = None,
    evidence: dict[str, Any] | None = None,
    learning_rate: float | None = None,
    algorithm: str = "grpo",
) -> LayerChoice:
    """Record a layer choice for `model`, reading names and counts from the model itself."""
    stack = find_layer_stack(model)
    chosen = validate_layers(layers, len(stack))
    names = tuple(layer_param_names(model, chosen))
    sizes = {name: p.numel() for name, p in model.named_parameters()}  # tied weights counted once
    return LayerChoice(
        model=model_name,
        revision=revision,
        num_layers=len(stack),
        stack_path=stack.path,
        layers=chosen,
        param_names=names,
        param_count=sum(sizes[name] for name in names),
        total_params=sum(sizes.values()),
        evidence=dict(evidence or {}),
        learning_rate=learning_rate,
        algorithm=algorithm,
        linear_modules=linear_module_names(model, chosen),
    )


# ---- json: the canonical record ----------------------------------------------------------------


def choice_json(choice: LayerChoice) -> str:
    """The canonical record: sorted keys, indent 2, with a format version."""
    record = asdict(choice)
    record["format_version"] = FORMAT_VERSION
    return json.dumps(record, sort_keys=True, indent=2) + "\n"


def choice_from_json(text: str, source: str = "layer choice") -> LayerChoice:
    """Read a record written by `choice_json`; errors name `source`."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise AutolayerError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise AutolayerError(f"{source} is not a JSON object")
    version = record.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise AutolayerError(
            f"{source} has format version {version!r}; this autolayer reads {FORMAT_VERSION}"
        )
    for key in ("layers", "param_names", "linear_modules"):
        if isinstance(record.get(key), list):
            record[key] = tuple(record[key])
    try:
        return LayerChoice(**record)
    except TypeError as err:
        raise AutolayerError(f"{source} does not describe a layer choice: {err}") from None


def load_choice(path: str | Path) -> LayerChoice:
    """Read a `layer_choice.json` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise AutolayerError(f"cannot read layer choice {path}: {err.strerror}") from None
    return choice_from_json(text, source=str(path))


# ---- Axolotl -----------------------------------------------------------------------------------


def axolotl_match(pattern: str, name: str) -> bool:
    """Axolotl's `unfrozen_parameters` rule (axolotl/utils/freeze.py, `LayerNamePattern`).

    Every `.` not followed by `+` is escaped to a literal dot, then `re.match`: anchored at the
    start only, so `model.layers.1` would also match layers 10-19. The optional `[start:end]`
    range suffix is not used by our patterns and not mirrored.
    """
    return re.match(re.sub(r"\.(?!\+)", "\\.", pattern), name) is not None


def axolotl_patterns(choice: LayerChoice) -> list[str]:
    """One pattern per layer, `^model.layers.7.`: unescaped, since Axolotl escapes the dots."""
    if not _STACK_PATH.fullmatch(choice.stack_path):
        raise AutolayerError(f"stack path {choice.stack_path!r} is not a dotted module name")
    return [f"^{prefix}" for prefix in choice.prefixes()]


def _header(choice: LayerChoice, tool: str, mark: str = "#") -> str:
    return (
        f"{mark} autolayer export ({tool}): train only decoder layers {list(choice.layers)} of "
        f"{choice.num_layers}\n"
        f"{mark} ({choice.param_count:,} of {choice.total_params:,} parameters; "
        f"model and revision below).\n"
    )


def axolotl_config(choice: LayerChoice) -> str:
    """Axolotl YAML keys to merge into a full fine-tuning (no `adapter:`) GRPO config."""
    data: dict[str, Any] = {"base_model": choice.model}
    if choice.revision is not None:
        data["revision_of_model"] = choice.revision
    data["rl"] = "grpo"
    if choice.learning_rate is not None:
        data["learning_rate"] = choice.learning_rate
    data["gradient_checkpointing"] = True
    data["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    data["unfrozen_parameters"] = axolotl_patterns(choice)
    notes = (
        "# Merge into your Axolotl config; add datasets and trl.reward_funcs yourself.\n"
        "# unfrozen_parameters: Axolotl escapes each '.' and matches from the name's start,\n"
        "#   so paste the patterns as they are; the trailing dot keeps layer 1 off 10-19.\n"
        "#   They assume the model loads as AutoModelForCausalLM (names as autolayer saw them).\n"
        "# Do not combine with peft_layers_to_transform (that is for LoRA adapters).\n"
        "# Reentrant gradient checkpointing gives frozen early layers no input that needs grad,\n"
        "#   so no gradient reaches the chosen layers: keep use_reentrant: false.\n"
        f"# Objective: TRL loss_type {choice.algorithm!r} (set it under trl: if your Axolotl "
        "supports it).\n"
    )
    return _header(choice, "Axolotl") + notes + yaml.safe_dump(data, sort_keys=False)


# ---- PEFT --------------------------------------------------------------------------------------


def peft_config(
    choice: LayerChoice, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0
) -> str:
    """`LoraConfig(**json.loads(text))` that puts LoRA on every linear of the chosen layers only.

    `target_modules` is an explicit list on purpose: PEFT applies `layers_to_transform` only in
    its list branch (`check_target_module_exists`); a regex string skips the layer filter, which
    older PEFT versions did silently (0.21 raises in `LoraConfig.__post_init__`).
    `layers_pattern` is the stack's last name component (`layers`, or `h` for GPT-2), which PEFT
    finds as `<pattern>.<index>.` in module names.
    """
    if not choice.linear_modules:
        raise AutolayerError(
            "this layer choice records no linear modules, so LoRA has no targets; "
            "re-create it from the model with choice_from_model"
        )
    data = {
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "bias": "none",
        "target_modules": list(choice.linear_modules),
        "layers_to_transform": list(choice.layers),
        "layers_pattern": choice.stack_path.rsplit(".", 1)[-1],
    }
    return json.dumps(data, indent=2) + "\n"


# ---- LLaMA-Factory -----------------------------------------------------------------------------


def llamafactory_trainable_layers(layers: Sequence[int], num_layers: int) -> int | None:
    """The `freeze_trainable_layers` value for `layers`: N for the last N, -N for the first N.

    None when the set is neither; LLaMA-Factory can express nothing else (its `use_llama_pro`
    stride mode is for expanded models). All layers reads as the last N.
    """
    chosen = validate_layers(layers, num_layers)
    count = len(chosen)
    if chosen == tuple(range(num_layers - count, num_layers)):
        return count
    if chosen == tuple(range(count)):
        return -count
    return None


def nearest_llamafactory_set(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The smallest first-N or last-N set that contains `layers` (last-N on a tie)."""
    chosen = validate_layers(layers, num_layers)
    last = tuple(range(chosen[0], num_layers))
    first = tuple(range(chosen[-1] + 1))
    return first if len(first) < len(last) else last


def _nested_index_clash(choice: LayerChoice) -> str | None:
    """A chosen name whose in-block path holds `.j.` for a chosen layer j (MoE experts, ...).

    LLaMA-Factory keeps a parameter trainable when `.{j}.` is anywhere in its name, so that
    parameter would train in every layer, not just the chosen ones.
    """
    chosen = set(choice.layers)
    for prefix in choice.prefixes():
        for name in choice.param_names:
            if name.startswith(prefix):
                inner = "." + name[len(prefix) :]
                if any(int(j) in chosen for j in re.findall(r"\.(\d+)(?=\.)", inner)):
                    return name
    return None


def llamafactory_config(choice: LayerChoice) -> str:
    """LLaMA-Factory freeze-tuning keys, only when the set is exactly the first or last N layers."""
    n = llamafactory_trainable_layers(choice.layers, choice.num_layers)
    if n is None:
        nearest = nearest_llamafactory_set(choice.layers, choice.num_layers)
        raise AutolayerError(
            f"layers {list(choice.layers)} cannot be expressed in LLaMA-Factory, which trains only "
            f"the first or last N layers; the nearest expressible set is layers "
            f"{nearest[0]}-{nearest[-1]} ({len(nearest)} layers), or use another format"
        )
    clash = _nested_index_clash(choice)
    if clash is not None:
        raise AutolayerError(
            f"LLaMA-Factory matches '.N.' anywhere in a name, so for {clash} the same parameter "
            "would train in every layer; use another format for this model"
        )
    data = {
        "model_name_or_path": choice.model,
        **({"model_revision": choice.revision} if choice.revision is not None else {}),
        "finetuning_type": "freeze",
        "freeze_trainable_layers": n,
        "freeze_trainable_modules": "all",
    }
    if choice.learning_rate is not None:
        data["learning_rate"] = choice.learning_rate
    notes = (
        "# freeze_trainable_layers: N trains the last N layers, -N the first N; 'all' trains\n"
        "#   every parameter whose name contains '.i.' for a trainable index i.\n"
        "# LLaMA-Factory 0.9.x has no GRPO stage (stages: pt, sft, rm, ppo, dpo, kto); use these\n"
        "#   keys with the stage you run.\n"
    )
    return _header(choice, "LLaMA-Factory") + notes + yaml.safe_dump(data, sort_keys=False)


# ---- ms-swift ----------------------------------------------------------------------------------


def swift_regex(choice: LayerChoice) -> str:
    """A regex for `--trainable_parameters_regex` matching exactly the chosen layers' names.

    ms-swift applies it with `re.compile(regex).search(name)` (swift/utils/transformers_utils.py,
    `activate_parameters`); the pattern is anchored at both ends, so `re.fullmatch` agrees.
    """
    alternatives = "|".join(str(layer) for layer in choice.layers)
    return rf"^{re.escape(choice.stack_path)}\.(?:{alternatives})\..+$"


def _scale_rewards(algorithm: str) -> str:
    return "none" if algorithm == "dr_grpo" else "group"  # Dr. GRPO drops the std division


def swift_command(choice: LayerChoice) -> str:
    """A `swift rlhf --rlhf_type grpo` command line that trains only the chosen layers."""
    args = [
        ("--rlhf_type", "grpo"),
        ("--model", choice.model),
        *([("--model_revision", choice.revision)] if choice.revision is not None else []),
        ("--tuner_type", "full"),
        ("--freeze_parameters_ratio", "1"),
        ("--trainable_parameters_regex", swift_regex(choice)),
        *(
            [("--learning_rate", repr(choice.learning_rate))]
            if choice.learning_rate is not None
            else []
        ),
        ("--loss_type", choice.algorithm),
        ("--scale_rewards", _scale_rewards(choice.algorithm)),
        ("--gradient_checkpointing_kwargs", '{"use_reentrant": false}'),
        ("--dataset", "EDIT_ME_DATASET"),
        ("--reward_funcs", "EDIT_ME_REWARD"),
    ]
    lines = [f"    {flag} {shlex.quote(value)} \\" for flag, value in args]
    notes = (
        "# Assumes ms-swift 4.x, where the flag is --tuner_type (3.x spelled it --train_type).\n"
        "# --tuner_type full makes every parameter trainable, --freeze_parameters_ratio 1 freezes\n"
        "#   all of them, then --trainable_parameters_regex re-enables each name it matches with\n"
        "#   re.search (trainable_* wins over freeze_*; swift/utils/transformers_utils.py).\n"
        "# ms-swift's GRPO beta defaults to 0.04 (TRL's to 0.0): set --beta to what you intend.\n"
        "# EDIT ME: --dataset and --reward_funcs. Extra arguments pass through.\n"
    )
    command = "\n".join(["set -euo pipefail", "swift rlhf \\", *lines, '    "$@"'])
    return "#!/usr/bin/env bash\n" + _header(choice, "ms-swift") + notes + command + "\n"


# ---- TRL ---------------------------------------------------------------------------------------

_TRL_SCRIPT = '''\
"""GRPO with TRL training only decoder layers {layers}: {param_count:,} of {total_params:,} params.

Written by `autolayer export --format trl`. Edit the two sections marked EDIT ME (prompts and
reward), then run `python train_grpo.py`. Every other parameter is frozen before training, and the
script stops if the trainable count differs from the one autolayer measured.
"""

from __future__ import annotations

MODEL = {model!r}
REVISION = {revision!r}
LAYER_PREFIXES = {prefixes!r}
EXPECTED_TRAINABLE = {param_count!r}
LEARNING_RATE = {learning_rate!r}{learning_rate_note}
LOSS_TYPE = {algorithm!r}
SCALE_REWARDS = {scale_rewards!r}
OUTPUT_DIR = "grpo-layers-{layer_slug}"


def freeze_all_but_chosen_layers(model, prefixes=LAYER_PREFIXES, expected=EXPECTED_TRAINABLE):
    """Make only the parameters under `prefixes` trainable; return how many there are."""
    trainable = 0
    for name, param in model.named_parameters():
        keep = name.startswith(prefixes)
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
    if trainable != expected:
        raise SystemExit(
            f"{{trainable}} trainable parameters, expected {{expected}}: is this the model and "
            "revision autolayer measured, loaded with AutoModelForCausalLM?"
        )
    return trainable


# ---- EDIT ME: the prompts ------------------------------------------------------------------------
def build_dataset():
    """Prompts to roll out; extra columns (here `answer`) reach the reward function by name."""
    from datasets import Dataset

    return Dataset.from_dict({{"prompt": ["2 + 3 =", "7 - 4 ="], "answer": ["5", "3"]}})


# ---- EDIT ME: the verifiable reward --------------------------------------------------------------
def reward(completions, answer, **kwargs):
    """Placeholder: 1.0 when the completion contains the reference answer, else 0.0."""
    return [1.0 if ref in text else 0.0 for text, ref in zip(completions, answer)]


def main():
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(MODEL, revision=REVISION, dtype="auto")
    print(f"training {{freeze_all_but_chosen_layers(model):,}} parameters under {{LAYER_PREFIXES}}")
    config = GRPOConfig(
        output_dir=OUTPUT_DIR,
        learning_rate=LEARNING_RATE,
        loss_type=LOSS_TYPE,
        scale_rewards=SCALE_REWARDS,
        gradient_checkpointing=True,
        # with reentrant checkpointing, frozen early layers leave the chosen ones without gradients
        gradient_checkpointing_kwargs={{"use_reentrant": False}},
        # GRPOConfig defaults to bf16, which the Trainer refuses on CPU
        **({{}} if torch.cuda.is_available() else {{"use_cpu": True, "bf16": False}}),
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=build_dataset()
    )
    trainer.train()
    trainer.save_model(OUTPUT_DIR)


if __name__ == "__main__":
    main()
'''


def trl_script(choice: LayerChoice) -> str:
    """A runnable TRL GRPO script; its `freeze_all_but_chosen_layers` is testable on its own."""
    known = choice.learning_rate is not None
    return _TRL_SCRIPT.format(
        layers=list(choice.layers),
        param_count=choice.param_count,
        total_params=choice.total_params,
        model=choice.model,
        revision=choice.revision,
        prefixes=choice.prefixes(),
        learning_rate=choice.learning_rate if known else 1e-6,
        learning_rate_note="" if known else "  # TRL's default; autolayer recorded none",
        algorithm=choice.algorithm,
        scale_rewards=_scale_rewards(choice.algorithm),
        layer_slug="-".join(str(layer) for layer in choice.layers),
    )


# ---- dispatch and writing ----------------------------------------------------------------------

RENDERERS: dict[str, Callable[[LayerChoice], str]] = {
    "json": choice_json,
    "axolotl": axolotl_config,
    "peft": peft_config,
    "llamafactory": llamafactory_config,
    "swift": swift_command,
    "trl": trl_script,
}


def render(choice: LayerChoice, fmt: str) -> str:
    """The text of one format; unknown formats name the known ones."""
    if fmt not in RENDERERS:
        raise AutolayerError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](choice)


def write_export(choice: LayerChoice, fmt: str, out_dir: str | Path) -> list[Path]:
    """Render `fmt` and write it into `out_dir`; on any error nothing is written."""
    text = render(choice, fmt)  # before touching the disk, so a refusal leaves nothing behind
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / FILENAMES[fmt]
        write_text_atomic(path, text, 0o755 if fmt in _EXECUTABLE else 0o644)
    except OSError as err:
        raise AutolayerError(f"cannot write the {fmt} export to {out}: {err.strerror}") from None
    return [path]
