"""SmolLM2-135M-Instruct on CPU: what the base model gets right and what a short proxy run moves.

    make smollm2 && python benchmarks/smollm2.py [--model models/smollm2-135m-instruct]

Greedy answer to "What is 12 + 7?", the held-out score on the built-in `chat_arithmetic` task
(200 two-digit sums in chat form, 64 new tokens), then one proxy run (GRPO, 4 prompts x 4 samples)
on a middle layer, with its wall time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from autolayer.config import Config
from autolayer.loading import load_for, prepare_task
from autolayer.proxy import run_proxy
from autolayer.rollout import complete
from autolayer.scoring import Evaluation, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = Config()
    config.model.name = args.model
    config.task.name, config.task.eval_size = "chat_arithmetic", 200
    config.proxy = dataclasses.replace(
        config.proxy, steps=args.steps, prompts_per_step=4, num_generations=4,
        eval_every=args.steps, device="cpu",
    )  # fmt: skip
    work = load_for(config, prepare_task(config))
    model, tokenizer, task = work
    question = [{"role": "user", "content": "What is 12 + 7?"}]  # as the task renders prompts
    answer = complete(model, tokenizer, task, [question]).texts[0]
    print(f"greedy answer to 'What is 12 + 7?': {answer!r}")
    start = time.perf_counter()
    base = evaluate(model, tokenizer, task)
    print(f"base held-out score {base.score:.3f} +- {base.stderr:.3f} on {len(base.outcomes)} "
          f"prompts ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    result = run_proxy(work, config.proxy, [args.layer], args.lr, keep=False)
    after: Evaluation = result.final
    print(
        f"layer {args.layer}, {args.steps} steps at lr {args.lr:g}: {after.score:.3f} +- "
        f"{after.stderr:.3f} ({after.score - base.score:+.3f}); {result.seconds:.0f} s in all, "
        f"held-out scoring included"
    )


if __name__ == "__main__":
    main()
