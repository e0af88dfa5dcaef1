"""Does a static KV cache (optionally compiled) make the proxy's sampling faster?

    python benchmarks/generation.py --config examples/organism.yaml
    python benchmarks/generation.py --config examples/smollm2.yaml \
        --model models/smollm2-135m-instruct

Samples one proxy step's batch (prompts_per_step x num_generations, the task's max completion
length, temperature 1) with `model.generate` as `autolayer.rollout.generate_completions` calls it,
under each cache variant in turn, `--repeats` rounds interleaved after a warm-up round (compiling
happens in the warm-up; its seconds are reported apart). Prints the median seconds per variant
and per generated token position, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import CompileConfig

from autolayer.config import load_config
from autolayer.loading import load_for
from autolayer.rollout import eos_token_ids, stop_criteria
from autolayer.tasks import prompt_text

VARIANTS: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "static": {"cache_implementation": "static"},
    "static_compiled": {"cache_implementation": "static", "compile": True},
}


def sample(model: Any, tokenizer: Any, prompts: list[str], max_new: int, variant: str) -> int:
    """Generate once; returns the number of new token positions."""
    options = dict(VARIANTS[variant])
    compiled = options.pop("compile", False)
    if compiled:  # transformers compiles the decoding forward itself, on CPU only when told to
        model.generation_config.compile_config = CompileConfig()
        model.generation_config.compile_config._compile_all_devices = True
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=max_new,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
        stopping_criteria=stop_criteria(tokenizer, ()),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        disable_compile=not compiled,
        **options,
    )
    return int(out.shape[1] - enc["input_ids"].shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    config = load_config(args.config)
    if args.model:
        config.model.name = args.model
    config.model.dtype, config.proxy.device, config.task.eval_size = "float32", "cpu", 4
    model, tokenizer, task = load_for(config)
    model.eval()
    p = config.proxy
    rows = task.train["prompt"][: p.prompts_per_step]
    prompts = [prompt_text(x, tokenizer) for x in rows for _ in range(p.num_generations)]
    variants = args.variants.split(",")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    tokens: dict[str, list[int]] = {v: [] for v in variants}
    warmup: dict[str, float] = {}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):
            for variant in variants:
                torch.manual_seed(round_)
                start = time.perf_counter()
                n = sample(model, tokenizer, prompts, task.max_completion_length, variant)
                took = time.perf_counter() - start
                if round_ == 0:
                    warmup[variant] = round(took, 3)
                else:
                    seconds[variant].append(took)
                    tokens[variant].append(n)
    report: dict[str, Any] = {
        "model": config.model.name,
        "batch": len(prompts),
        "max_new_tokens": task.max_completion_length,
        "threads": torch.get_num_threads(),
        "warmup_s": warmup,
    }
    for variant in variants:
        per_token = [s / n for s, n in zip(seconds[variant], tokens[variant], strict=True)]
        report[variant] = {
            "median_s": round(statistics.median(seconds[variant]), 4),
            "median_ms_per_position": round(1000 * statistics.median(per_token), 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
