"""Time proxy steps on a model of Qwen3-0.6B's shapes, built from its config with random weights.

    python benchmarks/qwen3_timing.py [--layers 14] [--steps 6] [--tokenizer DIR] [--out DIR]

Qwen3-0.6B's published shapes (28 layers, hidden 1024, MLP 3072, 16 query and 8 KV heads of
128, a 151,936-token vocabulary, tied embeddings), random weights: nothing is downloaded. The
tokenizer comes from a converted model directory (`make smollm2`; its ids are below Qwen3's
vocabulary size), the task is the built-in `antonym` short-answer chat. Random weights answer
nonsense, so every reward is 0 and the update is zero; the step's work (sampling, the passes,
backward, the optimizer) is the real one, which is what is timed. Prints one JSON object:
median step seconds after the first, generated tokens per second, held-out scoring seconds,
peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from autolayer.config import config_from_dict
from autolayer.loading import load_for
from autolayer.proxy import run_proxy

QWEN3_0_6B = {
    "num_hidden_layers": 28,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
}


def build(tokenizer_dir: str, out: Path) -> Path:
    """A Qwen3-0.6B-shaped model with random weights and `tokenizer_dir`'s tokenizer at `out`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(
        **QWEN3_0_6B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="14", help="trained layers, e.g. 14 or 10,11")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="samples per prompt")
    parser.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    parser.add_argument("--out", default=None, help="where the built model goes (default: tmp)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="qwen3-0.6b-shapes-"))
    build(args.tokenizer, out)
    cuda = torch.cuda.is_available()
    config = config_from_dict(
        {
            "model": {"name": str(out), "dtype": "auto"},
            "task": {"name": "antonym", "eval_size": 64},
            "proxy": {
                "steps": args.steps, "eval_every": args.steps, "prompts_per_step": args.prompts,
                "num_generations": args.generations, "lr": 1e-4, "device": "auto",
            },
            "tracking": {"enabled": False},
        }
    )  # fmt: skip
    work = load_for(config)
    layers = [int(x) for x in args.layers.split(",")]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_proxy(work, config.proxy, layers, keep=False)
    seconds = time.perf_counter() - start
    steps = [h["proxy/step_seconds"] for h in result.history][1:]
    step = statistics.median(steps) if steps else float("nan")
    tokens = args.prompts * args.generations * work.task.max_completion_length
    report = {
        "model": "Qwen3-0.6B shapes, random weights",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "layers": layers,
        "batch": f"{args.prompts}x{args.generations}, {work.task.max_completion_length} tokens",
        "step_s": round(step, 3),
        "sampled_tokens_per_s": round(tokens / step, 1),
        "run_s": round(seconds, 1),
        "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
