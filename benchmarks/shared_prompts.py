"""Each distinct prompt once (sampling and the grouped passes) against the repeated path, in one
interleaved run, with the physical limit of a step beside them.

    python benchmarks/shared_prompts.py                      # every workload below
    python benchmarks/shared_prompts.py --only short-4x4 --rounds 2 [--paths shared study] [--trl]

Workloads, one trained layer each (the middle of the stack):
- `organism`: the bundled organism, examples/organism.yaml (16 x 8, 6-character prompts).
- `short-4x4`, `short-16x8`: SmolLM2-135M-Instruct on a short-answer chat workload: a system
  message and two worked examples before the question (the few-shot chat that fixes the answer
  format), at most 8 completion tokens; 4 prompts x 4 samples and 16 x 8.
- `long-64`: SmolLM2 on examples/smollm2.yaml's chat arithmetic, 64-token completions.

Per workload and path (`shared`: this code, the prompts' common prefix once, each distinct
prompt once, in sampling, the passes and the held-out scoring; `repeated`: every row's prompt
left-padded, prefilled and passed on its own, what c21c7c9 did, `GRPOModule.share_prompts =
False`; `study`: shared, and the frozen layers' prefills of the held-out and training prompts
kept by an earlier trial of the same layer, `frozen.FrozenStates`, as a search's later trials
find them): the median proxy step (first step left out) and the whole trial, `run_proxy` from
start to result with its held-out evaluations. Rounds alternate the paths' order, so slow phases
of a shared machine hit them all.

The physical limit of a step (at this layer, on this batch): decoding G x T tokens with every
prompt already in the KV cache, plus one forward and backward of the trained part of the stack
over each distinct prompt position once and every completion, the frozen layers' output given
(their prompt positions computed once per study, their completion positions by the decoding).
The proxy's excess over it is the prefill that sampling runs over each distinct prompt position
through the whole stack before the loss runs the trained part again.

With `--trl`, TRL's `GRPOTrainer` (no vLLM) runs the same steps of the same workload as
`autolayer train` builds it, timed per optimizer step (benchmarks/proxy_vs_trl.py's timer).

SmolLM2 comes from `make smollm2` (models/smollm2-135m-instruct). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from typing import Any

import datasets
import torch
from proxy_vs_trl import trl_steps  # benchmarks/ is on the path of `python benchmarks/...`

from autolayer import prefix
from autolayer.config import Config, load_config
from autolayer.frozen import Frozen, FrozenStates, prefill_below
from autolayer.loading import Workload, load_for
from autolayer.models import find_layer_stack
from autolayer.proxy import GRPOModule, run_proxy
from autolayer.rollout import eos_token_ids
from autolayer.tasks import prompt_text

SMOLLM2 = "models/smollm2-135m-instruct"
SYSTEM = "You are a calculator. Reply with the number only."
SHOTS = [("What is 12 + 7?", "19"), ("What is 45 + 38?", "83")]


def few_shot(question: str) -> list[dict[str, str]]:
    """The short-answer chat: a system message and two worked examples, then the question."""
    turns = [{"role": "system", "content": SYSTEM}]
    for q, a in SHOTS:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*turns, {"role": "user", "content": question}]


def _question(prompt: Any) -> str:
    """The question of a text prompt, or of the last user turn of a chat prompt."""
    return prompt if isinstance(prompt, str) else str(prompt[-1]["content"])


def short_answer(work: Workload) -> Workload:
    """The chat-arithmetic task asked as a few-shot chat, answers cut at 8 tokens."""
    task = work.task

    def chat(split: datasets.Dataset) -> datasets.Dataset:
        rows = [{**r, "prompt": few_shot(_question(r["prompt"]))} for r in split]
        return datasets.Dataset.from_list(rows)

    short = dataclasses.replace(
        task, train=chat(task.train), eval=chat(task.eval), max_completion_length=8
    )
    return Workload(work.model, work.tokenizer, short)


def workload(name: str, eval_size: int) -> tuple[Workload, Config]:
    path = "examples/organism.yaml" if name == "organism" else "examples/smollm2.yaml"
    config = load_config(path)
    config.model.dtype = "float32"
    config.tracking.enabled = False
    config.task.eval_size = eval_size
    config.proxy.device = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("short"):
        config.proxy.prompts_per_step, config.proxy.num_generations = (
            (4, 4) if name == "short-4x4" else (16, 8)
        )
    work = load_for(config)
    return (short_answer(work) if name.startswith("short") else work), config


PATHS = ("repeated", "shared", "study")


def trial(
    work: Workload, config: Config, layer: int, path: str, states: FrozenStates
) -> tuple[list[float], float]:
    """Step seconds (the first left out) and the whole run's seconds, on one path."""
    GRPOModule.share_prompts = path != "repeated"
    try:
        store = states if path == "study" else None
        result = run_proxy(work, config.proxy, [layer], keep=False, states=store)
    finally:
        GRPOModule.share_prompts = True
    return [h["proxy/step_seconds"] for h in result.history][1:], result.seconds


def physical_limit(work: Workload, config: Config, layer: int, repeats: int) -> dict[str, float]:
    """Median seconds of decoding one step's batch from a full prompt cache, and of the trained
    part's forward and backward over the distinct prompts and the completions."""
    model, tokenizer, task = work
    cfg = config.proxy
    module = GRPOModule(work, cfg, [layer], cfg.lr)
    batch = {k: list(task.train[k][: cfg.prompts_per_step]) for k in task.train.column_names}
    decode, top = [], []
    for _ in range(repeats + 1):  # the first round warms up
        roll = module._rollout(batch)
        decode.append(_decode_seconds(model, tokenizer, batch["prompt"], cfg, task))
        frozen = module._replayed(roll)
        rows = slice(0, roll.completion_ids.shape[0])
        if not frozen:  # layer 0, or generation kept nothing: keep the prefix with a pass
            frozen = {}
            with torch.no_grad(), module._frozen_prefix(frozen, 0):
                module._batch_logprobs(roll, rows)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with module._frozen_prefix(frozen, 0):
            module._batch_logprobs(roll, rows).sum().backward()
        top.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"decode_s": statistics.median(decode[1:]), "top_pass_s": statistics.median(top[1:])}


@torch.no_grad()
def step_batch(tokenizer: Any, prompts: list[Any], group: int) -> tuple[torch.Tensor, ...]:
    """A step's sampling batch as generation lays it out: each prompt `group` times, the
    common prefix first (ids, attention mask)."""
    texts = [prompt_text(p, tokenizer) for p in prompts for _ in range(group)]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return prefix.align(rows, tokenizer.pad_token_id)


def _decode_seconds(model: Any, tokenizer: Any, prompts: list[Any], cfg: Any, task: Any) -> float:
    """Sampling G completions per prompt with every prompt token but the last already cached:
    the decoding alone (its first step feeds the last prompt token)."""
    ids, mask = step_batch(tokenizer, prompts, cfg.num_generations)
    shared = prefix.prefill(model, ids, mask)
    assert shared is not None and shared.index is not None
    keyword = prefix.cache_keyword(model)
    start = time.perf_counter()
    model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=task.max_completion_length,
        do_sample=True, top_k=0, top_p=1.0, temperature=cfg.temperature,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_ids(model, tokenizer),
        **{keyword: shared.cache},
    )  # fmt: skip
    return time.perf_counter() - start


def prefill_seconds(work: Workload, config: Config, layer: int, repeats: int) -> dict[str, float]:
    """Median seconds of prefilling one step's batch (G samples of each prompt, shared), with
    every layer run and with the layers below `layer` from a study's kept prefill, interleaved:
    the one part of a step the kept prefills change, timed without the rest's noise."""
    model, tokenizer, task = work
    cfg = config.proxy
    model.eval()
    prompts = task.train[: cfg.prompts_per_step]["prompt"]
    ids, mask = step_batch(tokenizer, prompts, cfg.num_generations)
    frozen = Frozen(FrozenStates(), find_layer_stack(model).layers, layer)
    prefill_below(model, ids, mask, frozen)  # what an earlier trial keeps
    seconds: dict[str, list[float]] = {"shared": [], "study": []}
    for _ in range(repeats):
        for path, view in (("shared", None), ("study", frozen)):
            start = time.perf_counter()
            prefill_below(model, ids, mask, view)
            seconds[path].append(time.perf_counter() - start)
    assert frozen.states.hits == repeats
    return {f"{path}_prefill_s": round(statistics.median(v), 3) for path, v in seconds.items()}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    work, config = workload(name, args.eval_size)
    stack = work.model.config.num_hidden_layers
    layer = stack // 2
    if args.prefill_only:
        return {"layer": f"{layer} of {stack}", **prefill_seconds(work, config, layer, 7)}
    cfg = config.proxy
    cfg.steps, cfg.eval_every = args.steps, max(1, args.steps // 2)  # two held-out evaluations
    cfg.num_iterations, cfg.beta = 1, 0.0
    paths = [p for p in PATHS if p in args.paths]
    steps: dict[str, list[float]] = {p: [] for p in paths}
    trials: dict[str, list[float]] = {p: [] for p in paths}
    states = FrozenStates()
    if "study" in paths:  # an earlier trial of the study (same layer) left its prefills
        trial(work, config, layer, "study", states)
    for round_ in range(args.rounds):
        for path in paths if round_ % 2 == 0 else paths[::-1]:
            step_s, trial_s = trial(work, config, layer, path, states)
            steps[path] += step_s
            trials[path].append(trial_s)
    limit = physical_limit(work, config, layer, repeats=2)
    limit_s = limit["decode_s"] + limit["top_pass_s"]
    prompt_tokens = len(work.tokenizer(prompt_text(work.task.train[0]["prompt"], work.tokenizer))[
        "input_ids"
    ])  # fmt: skip
    row: dict[str, Any] = {
        "layer": f"{layer} of {stack}",
        "prompts_x_samples": f"{cfg.prompts_per_step}x{cfg.num_generations}",
        "prompt_tokens": prompt_tokens,
        "max_completion_tokens": work.task.max_completion_length,
        "trial": f"{cfg.steps} steps, 2 evaluations of {len(work.task.eval)} prompts",
    }
    for path in paths:
        row[f"{path}_step_s"] = round(statistics.median(steps[path]), 3)
        row[f"{path}_trial_s"] = round(statistics.median(trials[path]), 1)
    fastest = paths[-1]
    if "repeated" in paths and fastest != "repeated":
        row["step_speedup"] = round(row["repeated_step_s"] / row[f"{fastest}_step_s"], 2)
        row["trial_speedup"] = round(row["repeated_trial_s"] / row[f"{fastest}_trial_s"], 2)
    if "study" in paths:
        row["study_prefills_mb"] = round(states.nbytes / 2**20, 1)
    row["limit_s"] = round(limit_s, 3)
    row["limit_parts_s"] = {k: round(v, 3) for k, v in limit.items()}
    row[f"{fastest}_step_over_limit"] = round(row[f"{fastest}_step_s"] / limit_s, 2)
    if args.trl:
        config.train.steps, config.train.lr = args.steps, cfg.lr
        seconds, _ = trl_steps(*work, config, layer, "/tmp/shared_prompts_trl")
        row["trl_step_s"] = round(statistics.median(seconds), 3)
        row[f"trl_over_{fastest}"] = round(row["trl_step_s"] / row[f"{fastest}_step_s"], 2)
    return row


WORKLOADS = ("organism", "short-4x4", "short-16x8", "long-64")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=6, help="Proxy steps per trial.")
    parser.add_argument("--rounds", type=int, default=2, help="Trials per path, alternated.")
    parser.add_argument("--eval-size", type=int, default=100, help="Held-out prompts.")
    parser.add_argument(
        "--paths", nargs="*", choices=PATHS, default=list(PATHS),
        help="repeated: c21c7c9's; shared: each distinct prompt once; study: shared, with the "
        "frozen layers' prefills kept by an earlier trial of the study",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-only", action="store_true",
        help="Only time one step's prefill, every layer run against a study's kept prefill.",
    )  # fmt: skip
    parser.add_argument(
        "--trl", action="store_true", help="Also time TRL's GRPOTrainer on the same steps."
    )
    args = parser.parse_args()
    report: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
    }
    for name in args.only:
        report[name] = measure(name, args)
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
