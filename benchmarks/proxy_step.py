"""Time one proxy RL step: sample G completions per prompt, reward, loss, backward, step.

    python benchmarks/proxy_step.py [--config examples/organism.yaml] [--layers 4] [--steps 12]
        [--beta 0.04] [--num-iterations 2] [--no-shared-prefix]

Prints the median and p90 wall time of a training step over the steps after the first two (warm-up),
measured inside the Lightning training step, so held-out evaluations are excluded. Also prints the
held-out evaluation time and peak CUDA memory when on a GPU. Output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from autolayer.config import load_config
from autolayer.layers import parse_layers
from autolayer.loading import load_for
from autolayer.models import find_layer_stack
from autolayer.proxy import GRPOModule, run_proxy
from autolayer.scoring import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--layers", default=None, help="Layers to train (default: the middle one).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--beta", type=float, default=None, help="KL weight (default: config's)")
    parser.add_argument("--num-iterations", type=int, default=None)
    parser.add_argument(
        "--no-shared-prefix",
        action="store_true",
        help="Recompute the frozen layers below the trained ones in every pass.",
    )
    args = parser.parse_args()
    config = load_config(args.config)
    config.proxy.steps = args.steps
    if args.beta is not None:
        config.proxy.beta = args.beta
    if args.num_iterations is not None:
        config.proxy.num_iterations = args.num_iterations
    GRPOModule.share_prefix = not args.no_shared_prefix
    config.proxy.eval_every = args.steps  # a single evaluation, at the end
    work = load_for(config)
    model, tokenizer, task = work
    num_layers = len(find_layer_stack(model))
    layers = parse_layers(args.layers, num_layers) if args.layers else (num_layers // 2,)
    start = time.perf_counter()
    evaluate(model, tokenizer, task)
    eval_seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_proxy(work, config.proxy, layers)
    steps = [h["proxy/step_seconds"] for h in result.history][2:]
    report = {
        "model": config.model.name,
        "layers": list(layers),
        "device": str(next(model.parameters()).device),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "prompts_per_step": config.proxy.prompts_per_step,
        "num_generations": config.proxy.num_generations,
        "beta": config.proxy.beta,
        "num_iterations": config.proxy.num_iterations,
        "shared_prefix": GRPOModule.share_prefix,
        "step_ms_median": round(1000 * statistics.median(steps), 1),
        "step_ms_p90": round(1000 * statistics.quantiles(steps, n=10)[-1], 1)
        if len(steps) > 2
        else None,
        "eval_seconds": round(eval_seconds, 2),
        "eval_prompts": len(task.eval),
    }
    if torch.cuda.is_available():
        report["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
