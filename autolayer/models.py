"""Load causal LMs, find their decoder-layer stack, and freeze all but a chosen set of layers.

A *layer* is one whole decoder block (attention, MLP and their norms). Training a subset means every
other parameter is frozen: embeddings, the final norm, the LM head and anything tied to them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autolayer.errors import AutolayerError
from autolayer.hub import require_hub
from autolayer.layers import middle_third, resolve_model_path, validate_layers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerStack:
    """The decoder blocks of a model: `path` is the ModuleList's name inside the model."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def prefix(self, layer: int) -> str:
        """The `named_parameters()` prefix of one layer, with its dot: `model.layers.3.`."""
        return f"{self.path}.{layer}."


def _num_configured_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_layer_stack(model: nn.Module) -> LayerStack:
    """Find the decoder blocks without a per-architecture table.

    The stack is the `nn.ModuleList` of identical block classes holding the most parameters;
    when the config states the layer count, only lists of that length qualify. This covers
    Llama-style `model.layers`, GPT-2's `transformer.h`, GPT-NeoX's `gpt_neox.layers` and more.
    """
    expected = _num_configured_layers(model)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise AutolayerError(
            f"could not find the decoder-layer stack of {type(model).__name__}: no ModuleList of "
            f"{expected if expected is not None else 'identical'} blocks"
        )
    return LayerStack(path=best[1], layers=best[2])


def layer_param_names(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """The full `named_parameters()` names belonging to the given layers, in model order."""
    stack = find_layer_stack(model)
    prefixes = tuple(stack.prefix(layer) for layer in validate_layers(layers, len(stack)))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def freeze_except(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Make exactly the parameters of `layers` trainable and freeze all others; return their names.

    Tied weights are shared Parameter objects reported once by `named_parameters()`; they live
    outside the layer stack, so they stay frozen.
    """
    trainable = set(layer_param_names(model, layers))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [name for name, _ in model.named_parameters() if name in trainable]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold: only those that require grad."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AutolayerError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cores_given() -> int:
    """The CPU cores this process may use: its affinity mask (taskset, a scheduler's cpuset),
    capped by a cgroup v2 CPU quota (containers), at least 1. `os.cpu_count()` counts the whole
    machine, which oversubscribes a shared one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, else $OMP_NUM_THREADS if set, else the cores
    given. Threads beyond the cores a process has make OpenMP spin against itself: on a 2-core
    machine two runs of 2+ threads each slowed a proxy step 10x. Returns the count in use."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user's setting, already applied by OpenMP
    count = threads if threads is not None else cores_given()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 weights on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise AutolayerError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_skeleton(name: str, revision: str | None = None) -> nn.Module:
    """The model's module tree on the meta device, from its config alone: names, shapes and exact
    parameter counts without reading weights or a tokenizer (a 70B config builds in about a
    second, where loading it would read 140 GB)."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(name, revision)
    try:
        with torch.device("meta"):
            model: nn.Module = AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError) as err:
        raise AutolayerError(f"cannot load model {name!r}: {_first_line(err)}") from err
    return model


def model_config(name: str, revision: str | None = None) -> Any:
    """The model's transformers config; a missing or corrupt config.json is one sentence that
    names it (read before the tokenizer, whose loading reads it too and would take the blame)."""
    from transformers import AutoConfig

    path = _existing_path(name)
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as err:
        raise AutolayerError(f"cannot load model {name!r}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _existing_path(name: str) -> str:
    """The bundled model's directory, a local path that exists, or a hub id the hub can serve."""
    path = resolve_model_path(name)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise AutolayerError(f"model path {path} does not exist")
    if not Path(path).expanduser().exists():
        require_hub(f"the model '{name}'")
    return path


def load_model(
    name: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer by hub id, local path or `organism`.

    Returns `(model, tokenizer)` with the model in eval mode on `device`. Hub ids download through
    the usual HF cache unless `HF_HUB_OFFLINE=1`; a missing local path is a one-sentence error.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _existing_path(name)
    target = resolve_device(device)
    hf_config = model_config(name, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        usable = len(tokenizer) > 1 and bool(tokenizer("0 a")["input_ids"])
    except Exception:
        usable = False
    if not usable:  # without tokenizer files transformers builds an empty one that fails later
        raise AutolayerError(
            f"cannot load a tokenizer for model {name!r}: it has no usable tokenizer files; save "
            "one beside the weights with tokenizer.save_pretrained"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, revision=revision, dtype=resolve_dtype(dtype, target)
        )
    except SafetensorError as err:  # a truncated download, or a file that is not safetensors
        raise AutolayerError(
            f"cannot load model {name!r}: its weights file is corrupt or truncated "
            f"({_first_line(err)}); download or save it again"
        ) from err
    except (OSError, ValueError) as err:
        raise AutolayerError(f"cannot load model {name!r}: {_first_line(err)}") from err
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    return model.to(target).eval(), tokenizer  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerInfo:
    index: int
    path: str
    num_params: int
    middle_third: bool


def describe_layers(model: nn.Module) -> tuple[list[LayerInfo], int]:
    """Per-layer index, module path and parameter count, plus the parameter count outside the stack.

    Shared (tied) parameters are counted once, as `named_parameters()` reports them.
    """
    stack = find_layer_stack(model)
    middle = middle_third(len(stack))
    infos = [
        LayerInfo(i, f"{stack.path}.{i}", count_parameters(block.parameters()), i in middle)
        for i, block in enumerate(stack.layers)
    ]
    total = count_parameters(model.parameters())
    return infos, total - sum(info.num_params for info in infos)


@torch.no_grad()
def store_as_bf16(params: Iterable[nn.Parameter]) -> None:
    """Round weights to what bf16 storage keeps: an update below half a bf16 ULP of its weight
    is lost, as with bf16 master weights (Gate III, arXiv 2511.08567). The arithmetic stays in
    the weights' own dtype, so CPU and GPU behave alike."""
    for param in params:
        param.copy_(param.to(torch.bfloat16).to(param.dtype))


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters, to undo a trial's training in place."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in names}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put saved values back, drop trial-time state (grads, checkpointing) and freeze everything.

    The saved tensors become the parameters' storage (no copy, so no second copy of the layers
    in memory): a snapshot is restored once, then belongs to the model."""
    params = dict(model.named_parameters())
    for name, value in saved.items():
        params[name].data = value  # also restores the dtype if training upcast the layer to fp32
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    # transformers 5 renamed these; the v4 names warn and go in v6
    hf: Any = model  # transformers' PreTrainedModel API, untyped from an nn.Module
    if hasattr(hf, "is_activation_checkpointing"):
        if hf.is_activation_checkpointing:
            hf.activation_checkpointing_disable()
    elif getattr(hf, "is_gradient_checkpointing", False):
        hf.gradient_checkpointing_disable()
    model.eval()
