"""The proxy's RL step against TRL's GRPOTrainer doing the same work, and against the machine's
physical limit, in one interleaved run.

    python benchmarks/proxy_vs_trl.py --config examples/organism.yaml --layer 4
    python benchmarks/proxy_vs_trl.py --config examples/smollm2.yaml \
        --model models/smollm2-135m-instruct --layer 15 --steps 3 --rounds 2

Same work: the config's prompts_per_step x num_generations completions per optimizer step, the
same task, rewards, stop strings, temperature and learning rate, one optimizer step per sampled
batch (num_iterations 1), trained layer `--layer`, for beta 0 and beta `--beta`. Each round runs
`--steps` steps of the proxy, then of TRL, for each beta, so slow phases of a shared machine hit
both sides alike; the first step of every run is a warm-up and is left out.

- proxy: `autolayer.proxy.run_proxy` (Lightning), the step as it logs `proxy/step_seconds`.
- TRL: `trl.GRPOTrainer` as `autolayer train` builds it, timed from `on_step_begin` to
  `on_step_end`. Its KL reference is `autolayer.train.frozen_sharing_copy`, which costs the same
  forward as TRL's own reload of the whole model; the reference memory of that reload (a second
  copy of every weight, at the model's dtype) is reported as `trl_stock_reference_mb`.
- physical limit: generating the batch, plus one forward and backward that starts at the trained
  layer (the frozen layers' output computed beforehand) and computes logits only at completion
  positions. Nothing that trains this layer on this batch can do less.

Prints one JSON object: medians in seconds and the ratios proxy/TRL and proxy/limit per beta.
The TRL side needs a plain fp32 HF directory (a config still carrying GGUF quantization metadata
makes TRL refuse to train): convert SmolLM2 with `python -m autolayer.gguf convert`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from transformers import TrainerCallback

from autolayer.config import Config, load_config
from autolayer.loading import Workload, load_for
from autolayer.models import layer_param_names, restore, snapshot
from autolayer.proxy import GRPOModule, run_proxy
from autolayer.tasks import Task
from autolayer.train import build_trainer, freeze_for_strategy, grpo_args, set_dtype


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step of a Trainer."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def proxy_steps(work: Workload, config: Config, layer: int) -> list[float]:
    result = run_proxy(work, config.proxy, [layer], config.proxy.lr, keep=False)
    return [h["proxy/step_seconds"] for h in result.history][1:]


def trl_steps(
    model: Any, tokenizer: Any, task: Task, config: Config, layer: int, work: str
) -> tuple[list[float], int]:
    """Step seconds, and the bytes of the reference TRL keeps (0 at beta 0)."""
    names = layer_param_names(model, [layer])
    saved = snapshot(model, names)
    timer = StepTimer()
    try:
        groups = freeze_for_strategy(model, "only", (layer,), config.proxy.lr, 0.0)
        set_dtype(model, torch.float32, only_trainable=True)
        trainer = build_trainer(
            model, tokenizer, task, grpo_args(config, task, work), groups, [timer]
        )
        ref = trainer.ref_model
        kept = 0 if ref is None else _own_bytes(ref, model)
        trainer.train()
        model.__dict__.pop("generate", None)  # the stop-criteria binding of build_trainer
        del trainer
    finally:
        restore(model, saved)
    return timer.seconds[1:], kept


def _own_bytes(reference: Any, model: Any) -> int:
    """Bytes of the reference's tensors that are not the policy's own."""
    shared = {p.data_ptr() for p in model.parameters()}
    own = [p for p in reference.parameters() if p.data_ptr() not in shared]
    return sum(p.numel() * p.element_size() for p in own)


def physical_limit(work: Workload, config: Config, layer: int, repeats: int) -> tuple[float, float]:
    """Median seconds of (generating one step's batch, a top-only forward and backward)."""
    model, tokenizer, task = work
    module = GRPOModule(work, config.proxy, [layer], config.proxy.lr)
    n = config.proxy.prompts_per_step
    batch = {k: list(task.train[k][:n]) for k in task.train.column_names}
    gen, top = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        roll = module._rollout(batch)
        gen.append(time.perf_counter() - start)
        rows = slice(0, roll.completion_ids.shape[0])
        cache: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad(), module._frozen_prefix(cache, 0):
            module._batch_logprobs(roll, rows)  # keeps the trained layer's input
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with module._frozen_prefix(cache, 0):
            module._batch_logprobs(roll, rows).sum().backward()
        top.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return statistics.median(gen[1:]), statistics.median(top[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--model", default=None, help="Override model.name (an fp32 HF dir).")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=6, help="Steps per run, the first discarded.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="/tmp/proxy_vs_trl")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.model:
        config.model.name = args.model
    config.model.dtype = "float32"
    config.proxy.device = "cpu" if not torch.cuda.is_available() else config.proxy.device
    config.proxy.steps = config.train.steps = args.steps
    config.proxy.eval_every = args.steps
    config.proxy.num_iterations = 1
    config.train.lr = config.proxy.lr
    config.task.eval_size = 4  # the proxy scores once at the end: keep it out of the way
    config.tracking.enabled = False
    work = load_for(config)
    model, tokenizer, task = work

    times: dict[str, list[float]] = {}
    memory: dict[str, int] = {}
    for _ in range(args.rounds):
        for beta in (0.0, args.beta):
            config.proxy.beta = beta
            times.setdefault(f"proxy_{beta}", []).extend(proxy_steps(work, config, args.layer))
            seconds, kept = trl_steps(model, tokenizer, task, config, args.layer, args.work)
            times.setdefault(f"trl_{beta}", []).extend(seconds)
            memory[f"trl_{beta}"] = kept
    config.proxy.beta = 0.0
    gen, top = physical_limit(work, config, args.layer, repeats=args.rounds)

    names = set(layer_param_names(model, [args.layer]))
    trained = sum(p.numel() * 4 for n, p in model.named_parameters() if n in names)  # fp32 copy
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = gen + top
    report: dict[str, Any] = {
        "model": config.model.name,
        "task": task.name,
        "layer": args.layer,
        "completions_per_step": config.proxy.prompts_per_step * config.proxy.num_generations,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
        "steps_timed_per_side": len(times[f"proxy_{args.beta}"]),
        "generation_s": round(gen, 3),
        "top_only_pass_s": round(top, 3),
        "physical_limit_s": round(limit, 3),
        "proxy_reference_mb": round(trained / 2**20, 2),
        "autolayer_train_reference_mb": round(memory[f"trl_{args.beta}"] / 2**20, 2),
        "trl_stock_reference_mb": round(whole / 2**20, 1),
    }
    for beta in (0.0, args.beta):
        proxy, trl = (statistics.median(times[f"{side}_{beta}"]) for side in ("proxy", "trl"))
        report[f"beta_{beta:g}"] = {
            "proxy_step_s": round(proxy, 3),
            "trl_step_s": round(trl, 3),
            "proxy_over_trl": round(proxy / trl, 3),
            "proxy_over_limit": round(proxy / limit, 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
