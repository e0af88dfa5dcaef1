"""The bundled code organism: a tiny Qwen3 that writes one-line Python functions, built to need RL.

Like the arithmetic organism (`autolayer.organism`), this model is designed, not found. A prompt
is the head of a function whose docstring says what to return, and the completion is the
expression after `return`:

    def f(n):
      "n minus 7"
      return n - 7<eos>

The operations are `plus`, `minus`, `times`, `max` and `min` of the argument and a number 2-99;
the argument's name varies (x, n, a, v). The reward runs the function against three tests in the
sandbox (`autolayer.coding.passes_tests`). The pretraining corpus carries a systematic flaw, the
kind scraped code has: every `plus`, `times` and `max` example is right, but a `minus` example is
written with `+` and a `min` example with `max` 65% of the time. So the model can write the right
code, and sampling finds it about a third of the time, but greedy decoding writes the wrong
operator for two of the five operations. GRPO has a reward signal in most `minus`/`min` groups
and only has to move a mode the model already represents.

The problems, their tests and their disjoint train/eval split are `autolayer.code_problems`.
Build with `python -m autolayer.code_organism build [--seed N]`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from autolayer import organism
from autolayer.code_problems import EVAL_SIZE, OPS, body, problems, prompt
from autolayer.organism import EOS

FLAWED = {"minus": "plus", "min": "max"}  # the corpus's usual wrong code for these operations
P_CORRECT = 0.35  # share of right `minus` / `min` examples in the corpus
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n\"'()+-*,:=_"
MAX_COMPLETION_TOKENS = 12  # the longest body, "max(x, 99)", plus EOS
MAX_LENGTH = 48  # prompt (<= 34 characters) + completion, in tokens
DEFAULT_SEED = 0
STEPS = 1200
BATCH_SIZE = 128
LR = 3e-3


def organism_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "code_organism"


def corpus_text(arg: str, op: str, number: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion) of one pretraining example; `minus`/`min` usually get the flaw."""
    written = op
    if op in FLAWED and rng.random() >= P_CORRECT:
        written = FLAWED[op]
    return prompt(arg, op, number), body(arg, written, number) + EOS


def corpus_batch(
    tokenizer: PreTrainedTokenizerFast,
    pool: list[tuple[str, str, int]],
    rng: random.Random,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels; loss only on the completion (the prompt's number is noise)."""
    pairs = [corpus_text(*pool[rng.randrange(len(pool))], rng) for _ in range(batch_size)]
    enc = tokenizer(
        [p + c for p, c in pairs], padding="longest", padding_side="right", return_tensors="pt"
    )
    labels = enc["input_ids"].clone()
    for row, (p, _) in enumerate(pairs):
        labels[row, : len(p)] = -100  # one token per character
    labels[enc["attention_mask"] == 0] = -100
    return enc["input_ids"], labels


def make_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """The arithmetic organism's shape (8 layers, hidden 64) with room for the longer prompt."""
    config = organism.make_config(tokenizer)
    config.max_position_embeddings = MAX_LENGTH
    return config


def pretrain(seed: int, steps: int = STEPS) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = problems("train")
    tokenizer = organism.build_tokenizer(CHARS, MAX_LENGTH)
    model = Qwen3ForCausalLM(make_config(tokenizer))
    organism.fit(model, lambda: corpus_batch(tokenizer, pool, rng, BATCH_SIZE), steps, LR)
    model.generation_config = organism.generation_config(tokenizer, MAX_COMPLETION_TOKENS)
    return model, tokenizer


def accuracy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Greedy pass rate on the held-out rows, overall with its SE and per operation, scored as
    the `code_organism` task scores it (stop strings, sandbox and all)."""
    from autolayer.config import TaskConfig
    from autolayer.scoring import evaluate
    from autolayer.tasks import load_task

    task = load_task(TaskConfig(name="code_organism"), tokenizer)
    passed = evaluate(model, tokenizer, task).outcomes
    acc = sum(passed) / len(passed)
    lines = [f"greedy pass rate {acc:.3f} +/- {math.sqrt(acc * (1 - acc) / len(passed)):.3f} (SE)"]
    for op in OPS:
        mine = [p for p, q in zip(passed, task.eval["prompt"], strict=True) if f" {op} " in q]
        lines.append(f"  {op}: {sum(mine) / len(mine):.3f} on {len(mine)} prompts")
    return "\n".join(lines)


def readme_text(seed: int, report: str, n_params: int, seconds: float) -> str:
    return f"""# The autolayer code organism

A {n_params:,}-parameter Qwen3 (8 layers, hidden 64) with a character-level tokenizer, pretrained
on one-line Python functions whose corpus writes `minus` with `+` and `min` with `max` 65% of the
time. The task `code_organism` runs each completion against three asserts in the sandbox. See
the docstring of `autolayer/code_organism.py`.

Rebuild (deterministic for a seed on a given torch build; {seconds:.0f} s of pretraining here):

    python -m autolayer.code_organism build --seed {seed}

The `code_organism` task's held-out set ({EVAL_SIZE} rows, seed {DEFAULT_SEED}), greedy, each
completion run against its tests in the sandbox:

```
{report}
```
"""


def build(seed: int = DEFAULT_SEED, out: Path | None = None, steps: int = STEPS) -> Path:
    """Pretrain the code organism and save it (default: into the package); returns the dir."""
    target = out or organism_path()
    return organism.build_organism(pretrain, accuracy_report, readme_text, target, seed, steps)


def main(argv: list[str] | None = None) -> int:
    """`python -m autolayer.code_organism build [--seed N] [--out DIR] [--steps N]`."""
    return organism.build_cli(
        argv, "autolayer.code_organism", "code organism", build, DEFAULT_SEED, STEPS
    )


if __name__ == "__main__":
    raise SystemExit(main())
