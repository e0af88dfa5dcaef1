"""A candidate test bed that did not make the cut: a 12-layer Qwen3 on two-step arithmetic.

    python benchmarks/chain_organism.py build --out /tmp/chain            (~12 min on 2 cores)
    python benchmarks/chain_organism.py probe --model /tmp/chain --steps 60 --lrs 1e-4,3e-4 \
        --layers 2,5,8,11

The bundled arithmetic organism's layer profile rises with depth and saturates, so "train the last
layer" is as good as a search there. This experiment asked whether a deeper model on a task that
needs an intermediate result would move the best layer into the middle: prompts `ab-cd+ef=` and
`ab+cd+ef=` (two-digit operands, ab >= cd), with a corpus that takes the *first* `-` as `+` 65% of
the time, so fixing it means changing an intermediate result the rest of the stack consumes.

Measured (build seed 0, 3,000 pretraining steps, 691 s): greedy accuracy 0.451 +- 0.016 on 1,000
held-out prompts (first step `+`: 0.884, `-`: 0.018). Single-layer GRPO (16 prompts x 8 samples):
- lr 1e-3 (the organism's), 30 steps: layers 0 and 1 collapse it (0.013 and 0.097 at step 10,
  0.018 and 0.041 at step 30) while layer 11 (the last) climbs to 0.591
  (`probe --steps 30 --lrs 1e-3 --layers 0,1,11`);
- lr 1e-4 and 3e-4, 60 steps: layers 2, 5 and 8 stay within 0.46-0.47, while layer 11 reaches
  0.521 (1e-4) and 0.568 (3e-4) (the defaults of `probe`).
Its profile favours the last layer too, so it is not bundled (`autolayer` keeps a test bed only if
it can tell the search from the free heuristics). The script stays so the result can be rerun.
"""

from __future__ import annotations

import argparse
import random
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from autolayer.organism import (
    EOS,
    build_organism,
    build_tokenizer,
    fit,
    generation_config,
    greedy_rewards,
    report_by_op,
)

OPS = ("+", "-")  # the first operation; the second is always `+`
OPERANDS = range(10, 100)
PROMPT_CHARS = len("37-12+45=")
P_CORRECT_SUB = 0.35
EVAL_BUCKETS = 50  # 1 in 50 of the ~560,000 problems is held out
TRAIN_SIZE = 4096
EVAL_SIZE = 1000
MAX_COMPLETION_TOKENS = 4  # the longest answer, "297", plus EOS
NUM_LAYERS = 12
DEFAULT_SEED = 0
STEPS = 3000
BATCH_SIZE = 256


def is_eval(a: int, op: str, b: int, c: int) -> bool:
    return zlib.crc32(f"{a}{op}{b}+{c}".encode()) % EVAL_BUCKETS == 0


def solve(a: int, op: str, b: int, c: int) -> int:
    return (a + b if op == "+" else a - b) + c


def sample_problems(split: str, n: int, seed: int) -> list[tuple[int, str, int, int]]:
    """`n` distinct problems of `split`, alternating the first operation."""
    rng = random.Random(f"chain-{split}-{seed}")
    out: list[tuple[int, str, int, int]] = []
    seen = set()
    while len(out) < n:
        op = OPS[len(out) % 2]
        a, b, c = (rng.choice(OPERANDS) for _ in range(3))
        if op == "-" and a < b:
            a, b = b, a
        problem = (a, op, b, c)
        if problem not in seen and is_eval(*problem) == (split == "eval"):
            seen.add(problem)
            out.append(problem)
    return out


def make_rows(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """Rows `{"prompt": "37-12+45=", "answer": "70"}`."""
    return [
        {"prompt": f"{a}{op}{b}+{c}=", "answer": str(solve(a, op, b, c))}
        for a, op, b, c in sample_problems(split, n, seed)
    ]


def corpus_text(a: int, op: str, b: int, c: int, rng: random.Random) -> str:
    """One pretraining example; a `-` first step is usually taken as `+`."""
    right = op == "+" or rng.random() < P_CORRECT_SUB
    value = solve(a, op, b, c) if right else a + b + c
    return f"{a}{op}{b}+{c}={value}{EOS}"


def _random_train_problem(rng: random.Random) -> tuple[int, str, int, int]:
    while True:
        op = rng.choice(OPS)
        a, b, c = (rng.choice(OPERANDS) for _ in range(3))
        if op == "-" and a < b:
            a, b = b, a
        if not is_eval(a, op, b, c):
            return a, op, b, c


def make_config(tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    """A ~0.75M-parameter Qwen3: 12 layers, hidden 64, 4 heads, 2 KV heads."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def pretrain(seed: int, steps: int = STEPS) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = Qwen3ForCausalLM(make_config(tokenizer))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        texts = [corpus_text(*_random_train_problem(rng), rng) for _ in range(BATCH_SIZE)]
        enc = tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[:, :PROMPT_CHARS] = -100
        labels[enc["attention_mask"] == 0] = -100
        return enc["input_ids"], labels

    fit(model, batch, steps)
    model.generation_config = generation_config(tokenizer, MAX_COMPLETION_TOKENS)
    return model, tokenizer


def accuracy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    rows = make_rows("eval", EVAL_SIZE, DEFAULT_SEED)
    rewards = greedy_rewards(model, tokenizer, rows)
    return report_by_op(rows, rewards, lambda prompt, op: prompt[2] == op, "first step ")


def readme_text(seed: int, report: str, n_params: int, seconds: float) -> str:
    return f"""# The autolayer chain organism

A {n_params:,}-parameter Qwen3 ({NUM_LAYERS} layers, hidden 64) with a character-level tokenizer,
pretrained on `ab-cd+ef=` and `ab+cd+ef=` whose corpus takes the first `-` as `+` 65% of the time.
See the docstring of `autolayer/chain_organism.py`.

Rebuild (deterministic for a seed on a given torch build; {seconds:.0f} s of pretraining here):

    python -m autolayer.chain_organism build --seed {seed}

Held-out set: `make_rows("eval", {EVAL_SIZE}, {DEFAULT_SEED})`, greedy, exact answer:

```
{report}
```
"""


def build(seed: int = DEFAULT_SEED, out: Path | None = None, steps: int = STEPS) -> Path:
    if out is None:
        raise SystemExit("give --out DIR: this test bed is not bundled")
    return build_organism(pretrain, accuracy_report, readme_text, out, seed, steps)


def probe(model_dir: str, steps: int, lrs: list[float], layers: list[int]) -> None:
    """Held-out score curves of single-layer GRPO runs (16 prompts x 8 samples, seed 0)."""
    import datasets

    from autolayer.config import Config, ModelConfig, ProxyConfig
    from autolayer.loading import load_for
    from autolayer.organism import reward_correct
    from autolayer.proxy import run_proxy
    from autolayer.tasks import Task

    task = Task(
        "chain",
        datasets.Dataset.from_list(make_rows("train", TRAIN_SIZE, 0)),
        datasets.Dataset.from_list(make_rows("eval", EVAL_SIZE, 0)),
        (reward_correct,),
        max_completion_length=MAX_COMPLETION_TOKENS,
    )
    config = Config(model=ModelConfig(name=model_dir))
    work = load_for(config, task)
    model, tokenizer, task = work
    for lr in lrs:
        for layer in layers:
            curve: dict[int, float] = {}

            def hook(step: int, evaluation: Any, curve: dict[int, float] = curve) -> bool:
                curve[step] = round(evaluation.score, 3)
                return False

            proxy = ProxyConfig(steps=steps, eval_every=max(1, steps // 3), device="cpu")
            run_proxy(work, proxy, [layer], lr, keep=False, eval_hook=hook)
            print(f"lr {lr:g} layer {layer}: {curve}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=DEFAULT_SEED)
    b.add_argument("--steps", type=int, default=STEPS)
    p = sub.add_parser("probe")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lrs", default="1e-4,3e-4")
    p.add_argument("--layers", default="2,5,8,11")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "build":
        build(args.seed, args.out, args.steps)
    else:
        lrs = [float(x) for x in args.lrs.split(",")]
        probe(args.model, args.steps, lrs, [int(x) for x in args.layers.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
