"""GiGPO against GRPO and Dr. GRPO on the same environment, one layer, several seeds.

    python benchmarks/gigpo_vs_grpo.py [--config examples/agent.yaml] [--layer 4] [--steps 12]
                                       [--seeds 0,1,2,3,4]

Trains `--layer` of the config's model with each algorithm for `--steps` proxy steps per seed
(the same seeds, hence the same initial states, for every algorithm) and prints the held-out
success rate per seed and its mean. A short horizon keeps the comparison off the ceiling.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from autolayer.config import load_config
from autolayer.loading import load_for, prepare_task
from autolayer.proxy import run_proxy
from autolayer.scoring import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/agent.yaml")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    config = load_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = load_for(config, prepare_task(config))
    model, tokenizer, task = work
    base = evaluate(model, tokenizer, task)
    print(f"base: {base.score:.3f} ± {base.stderr:.3f} on {len(base.outcomes)} held-out episodes")
    print(f"layer {args.layer}, {args.steps} steps, lr {config.proxy.lr:g}, seeds {seeds}")
    for algorithm in ("gigpo", "grpo", "dr_grpo"):
        scores = []
        for seed in seeds:
            proxy = replace(
                config.proxy, algorithm=algorithm, steps=args.steps, eval_every=args.steps,
                seed=seed,
            )  # fmt: skip
            result = run_proxy(work, proxy, [args.layer], proxy.lr, keep=False)
            scores.append(result.score)
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        per_seed = " ".join(f"{s:.3f}" for s in scores)
        print(f"{algorithm:<8} {per_seed}   mean {statistics.mean(scores):.3f} (sd {spread:.3f})")


if __name__ == "__main__":
    main()
