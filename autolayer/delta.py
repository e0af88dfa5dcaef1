"""Ship the trained layers alone: a safetensors delta with a manifest, and a checked merge.

Training a few layers changes a few percent of the weights, so the artifact is those layers' tensors
plus a manifest naming the base (id, revision, layer stack) and hashing two things per tensor: the
delta's own bytes (catches a corrupt or edited file) and the base's bytes of the same parameter
(catches merging into the wrong base, which would otherwise load fine and silently misbehave).
The train code hashes the base with `hash_parameters` *before* training and hands the result to
`save_delta`, so no second copy of the model is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from autolayer.errors import AutolayerError
from autolayer.files import atomic_dir
from autolayer.layers import validate_layers
from autolayer.models import find_layer_stack, layer_param_names, load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DELTA_FORMAT_VERSION = 1
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in memory order (dtype and shape are checked separately)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def hash_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """sha256 of the named parameters' current values; call it on the base before training."""
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise KeyError(f"model has no parameter {missing[0]}")
    return {name: tensor_sha256(params[name]) for name in names}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _manifest(
    model: nn.Module,
    layers: tuple[int, ...],
    tensors: Mapping[str, torch.Tensor],
    base_hashes: Mapping[str, str],
    base_model: str,
    base_revision: str | None,
) -> dict[str, Any]:
    stack = find_layer_stack(model)
    dtypes = {_dtype_name(t.dtype) for t in tensors.values()}
    return {
        "format": "autolayer-delta",
        "format_version": DELTA_FORMAT_VERSION,
        "base_model": base_model,
        "base_revision": base_revision,
        "architecture": type(model).__name__,
        "stack_path": stack.path,
        "num_layers": len(stack),
        "layers": list(layers),
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "parameters": [
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": _dtype_name(t.dtype),
                "sha256": tensor_sha256(t),
                "base_sha256": base_hashes[name],
            }
            for name, t in tensors.items()
        ],
    }


def save_delta(
    model: nn.Module,
    layers: Sequence[int],
    out_dir: str | Path,
    base_model: str,
    base_revision: str | None,
    base_model_for_hash: nn.Module | None = None,
    *,
    base_hashes: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir/delta.safetensors` (the chosen layers' parameters) and `manifest.json`.

    The base's values of those parameters are identified by `base_hashes` (from
    `hash_parameters(base, names)` taken before training) or hashed from `base_model_for_hash`;
    give exactly one. Returns `out_dir`.
    """
    if (base_hashes is None) == (base_model_for_hash is None):
        raise ValueError("give exactly one of base_hashes and base_model_for_hash")
    stack = find_layer_stack(model)
    chosen = validate_layers(layers, len(stack))
    names = layer_param_names(model, chosen)
    if base_model_for_hash is not None:
        base_hashes = hash_parameters(base_model_for_hash, names)
    assert base_hashes is not None
    missing = [name for name in names if name not in base_hashes]
    if missing:
        raise ValueError(f"base_hashes lacks {missing[0]}; hash every parameter of the layers")
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to("cpu").contiguous().clone() for name in names}
    manifest = _manifest(model, chosen, tensors, base_hashes, base_model, base_revision)
    try:
        with atomic_dir(out_dir, overwrite) as tmp:
            save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": "pt"})
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as err:
        raise AutolayerError(f"cannot write the delta to {out_dir}: {err.strerror}") from None
    return Path(out_dir)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutolayerError(f"{path} is missing; is {path.parent} an autolayer delta?") from None
    except (OSError, ValueError) as err:
        raise AutolayerError(f"cannot read delta manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "autolayer-delta":
        raise AutolayerError(f"{path} is not an autolayer delta manifest")
    if manifest.get("format_version") != DELTA_FORMAT_VERSION:
        raise AutolayerError(
            f"{path} has delta format version {manifest.get('format_version')!r}; "
            f"this autolayer reads {DELTA_FORMAT_VERSION}"
        )
    return manifest


def load_delta(delta_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a delta: every tensor present, with the manifest's shape, dtype and hash."""
    directory = Path(delta_dir)
    manifest = _read_manifest(directory / MANIFEST_FILE)
    path = directory / DELTA_FILE
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise AutolayerError(f"{path} is missing; the delta is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise AutolayerError(f"{path} is not a readable safetensors file: {err}") from None
    entries = manifest["parameters"]
    if set(tensors) != {entry["name"] for entry in entries}:
        raise AutolayerError(f"{path} does not hold the parameters its manifest lists")
    for entry in entries:
        tensor = tensors[entry["name"]]
        if list(tensor.shape) != entry["shape"] or _dtype_name(tensor.dtype) != entry["dtype"]:
            raise AutolayerError(
                f"{entry['name']} in {path} has another shape or dtype than its manifest lists"
            )
        if tensor_sha256(tensor) != entry["sha256"]:
            raise AutolayerError(
                f"{entry['name']} in {path} does not match its manifest hash; "
                "the file is corrupt or was edited"
            )
    return manifest, tensors


def check_base(base: nn.Module, manifest: Mapping[str, Any]) -> None:
    """Refuse, naming the first difference, a base other than the one the delta was trained from."""
    wanted = f"{manifest['base_model']} (revision {manifest['base_revision'] or 'default'})"
    stack = find_layer_stack(base)
    if stack.path != manifest["stack_path"] or len(stack) != manifest["num_layers"]:
        raise AutolayerError(
            f"the delta needs a base with {manifest['num_layers']} layers at "
            f"{manifest['stack_path']}, but this model has {len(stack)} at {stack.path}; "
            f"load {wanted}"
        )
    params = dict(base.named_parameters())
    for entry in manifest["parameters"]:
        name = entry["name"]
        param = params.get(name)
        if param is None:
            raise AutolayerError(f"this model has no parameter {name}; the delta needs {wanted}")
        if list(param.shape) != entry["shape"] or _dtype_name(param.dtype) != entry["dtype"]:
            raise AutolayerError(
                f"{name} is {_dtype_name(param.dtype)} {list(param.shape)} here but "
                f"{entry['dtype']} {entry['shape']} in the delta; load {wanted} in that dtype"
            )
        if tensor_sha256(param) != entry["base_sha256"]:
            raise AutolayerError(
                f"{name} of this model differs from the base the delta was trained from; "
                f"load {wanted}"
            )


def merge_delta(base: nn.Module, delta_dir: str | Path) -> nn.Module:
    """Copy a verified delta into `base` in place after checking it is the right base."""
    return apply_delta(base, *load_delta(delta_dir))


def apply_delta(
    base: nn.Module, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Copy `load_delta`'s tensors into `base` in place after checking it is the right base."""
    check_base(base, manifest)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return base


def merge_to_dir(
    base_name: str, delta_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Load the manifest's base on CPU, merge the delta, and save model + tokenizer to `out_dir`.

    The base loads in the delta's dtype (float32 when the delta mixes dtypes), so the base hashes
    compare like for like.
    """
    manifest, tensors = load_delta(delta_dir)  # a corrupt delta fails before the base loads
    model, tokenizer = load_model(
        base_name,
        revision=manifest["base_revision"],
        dtype=manifest["dtype"] or "float32",
        device="cpu",
    )
    apply_delta(model, manifest, tensors)
    try:
        with atomic_dir(out_dir, overwrite) as tmp:
            cast("PreTrainedModel", model).save_pretrained(tmp)
            cast("PreTrainedTokenizerBase", tokenizer).save_pretrained(tmp)
    except OSError as err:
        raise AutolayerError(f"cannot write the merged model to {out_dir}: {err}") from None
    return Path(out_dir)
