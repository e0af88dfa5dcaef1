"""A deeper test bed: a 12-layer Qwen3 on two-step arithmetic whose first step needs RL.

The single-step organism (`autolayer.organism`) has a layer profile that rises with depth and
saturates: the last layers can move the answer's mode themselves, so "train the last layer" is
as good as a search there. This organism asks for a chain, `"ab-cd+ef="` or `"ab+cd+ef="`
(two-digit operands, ab >= cd), and its corpus gets the *first* step wrong: a `-` is read as `+`
65% of the time, as in the single-step organism. Fixing it means changing an intermediate result
that the rest of the stack consumes, which is the kind of change the RL layer papers locate in
middle layers (arXiv 2607.01232); whether this model's profile agrees is measured, not assumed:
`python benchmarks/fidelity.py --config examples/chain_organism.yaml`.

Build with `python -m autolayer.chain_organism build [--seed N] [--out DIR] [--steps N]`.
"""

from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from autolayer.organism import (
    EOS,
    build_cli,
    build_organism,
    build_tokenizer,
    fit,
    generation_config,
    greedy_rewards,
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


def organism_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "chain_organism"


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
    acc = sum(rewards) / len(rewards)
    lines = [f"greedy accuracy {acc:.3f} +/- {math.sqrt(acc * (1 - acc) / len(rows)):.3f} (SE)"]
    for op in OPS:
        mine = [r for r, row in zip(rewards, rows, strict=True) if row["prompt"][2] == op]
        lines.append(f"  first step {op}: {sum(mine) / len(mine):.3f} on {len(mine)} prompts")
    return "\n".join(lines)


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
    target = out or organism_path()
    return build_organism(pretrain, accuracy_report, readme_text, target, seed, steps)


def main(argv: list[str] | None = None) -> int:
    return build_cli(argv, "autolayer.chain_organism", "chain organism", build, DEFAULT_SEED, STEPS)


if __name__ == "__main__":
    raise SystemExit(main())
