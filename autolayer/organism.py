"""The bundled model organism: a tiny Qwen3 trained on two-digit arithmetic, built to need RL.

This model is designed on purpose, not found. It exists so tests and the demo can show RL at work
without a download: GRPO that updates a single middle decoder layer must measurably improve it.

The task is `"ab+cd="` and `"ab-cd="` with two-digit operands (a >= b for subtraction, so every
answer is a non-negative integer of 1-3 digits) and a completion of the answer followed by EOS.
The pretraining corpus mixes behaviours the way scraped data does: every `+` example is correct,
but a `-` example shows the right difference only `P_CORRECT_SUB` (35%) of the time and the sum
(the classic operator-confusion mistake) the rest. So the pretrained model *can* subtract, and
sampling at temperature 1 finds the difference about a quarter of the time (the corpus's 35% less
the model's own slips), but its greedy answer to `-` is the sum. Greedy accuracy is therefore
about the share of `+` prompts in the eval set (half) times how well it adds (all of them). GRPO
has a reward signal in nearly every `-` group and only has to move a mode the model already
represents, a change one middle layer can make.

Measured on the packaged build (seed 0): base greedy accuracy 0.514 (SE 0.016); plain GRPO on
layer 4 alone (G=8, temperature 1, 16 prompts a step, Adam lr 1e-3, 40 steps) reaches 0.83-0.86
across sampling seeds, about 20 SE. lr 1e-2 collapses it; layer 0 alone barely moves it.

Train and eval problems are disjoint: a stable hash of the operands puts 1 in `EVAL_BUCKETS` of
the problem space in eval. Build with `python -m autolayer.organism build [--seed N] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from autolayer.files import atomic_dir

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARS = "0123456789+-=* \n"  # `*`, space and newline are unused by the task but keep text decodable
OPS = ("+", "-")
OPERANDS = range(10, 100)  # two digits each, so every prompt is 6 characters and needs no padding
PROMPT_CHARS = len("37+45=")
P_CORRECT_SUB = 0.35  # share of right `-` answers in the corpus: sampled often, never greedy
EVAL_BUCKETS = 5  # 1 in 5 problems is held out: ~1,620 `+` and ~820 `-` eval problems
TRAIN_SIZE = 4096  # training prompts the organism task draws by default
EVAL_SIZE = 1000  # held-out prompts; SE of an accuracy near 0.5 is sqrt(.5*.5/1000) = 1.6 points
MAX_COMPLETION_TOKENS = 4  # the longest answer, "198", plus EOS
DEFAULT_SEED = 0

# Pretraining schedule: sized to finish in a few minutes on 2 CPU cores.
STEPS = 1500
BATCH_SIZE = 256
LR = 3e-3
WARMUP_STEPS = 100
LOG_EVERY = 100


def organism_path() -> Path:
    """The packaged model directory, loadable with `from_pretrained`."""
    return Path(__file__).resolve().parent / "assets" / "organism"


def build_tokenizer(chars: str = CHARS, max_length: int = 32) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, no BOS added to prompts.

    Prompts carry no BOS so `add_special_tokens=True` and `False` give the same ids, whichever a
    trainer uses. Left padding because batched generation continues from the right edge.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without the WordLevel spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=max_length,
    )


def is_eval(a: int, op: str, b: int) -> bool:
    """Whether a problem is held out; a stable hash (not Python's salted `hash`) of its text."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % EVAL_BUCKETS == 0


def solve(a: int, op: str, b: int) -> int:
    """The correct answer."""
    return a + b if op == "+" else a - b


def problems(split: str, op: str) -> list[tuple[int, str, int]]:
    """Every problem of one operation in a split, in a fixed order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [
        (a, op, b)
        for a in OPERANDS
        for b in OPERANDS
        if (op == "+" or a >= b) and is_eval(a, op, b) == (split == "eval")
    ]


def sample_problems(split: str, n: int, seed: int) -> list[tuple[int, str, int]]:
    """`n` problems, half of each operation, drawn without replacement until a pool runs out.

    Balancing the operations (the `-` pool is half the size of the `+` one) keeps base accuracy
    near one half instead of two thirds, leaving room for RL to show.
    """
    rng = random.Random(f"{split}-{seed}")
    pools = {op: problems(split, op) for op in OPS}
    queues: dict[str, list[tuple[int, str, int]]] = {op: [] for op in OPS}
    out = []
    for i in range(n):
        op = OPS[i % len(OPS)]
        if not queues[op]:
            queues[op] = rng.sample(pools[op], len(pools[op]))
        out.append(queues[op].pop())
    rng.shuffle(out)
    return out


def make_rows(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` task rows `{"prompt": "37+45=", "answer": "82"}` for `split` in {"train", "eval"}."""
    return [
        {"prompt": f"{a}{op}{b}=", "answer": str(solve(a, op, b))}
        for a, op, b in sample_problems(split, n, seed)
    ]


def extract_answer(completion: str) -> str:
    """The text before the first EOS, PAD, newline or whitespace; trailing junk is ignored."""
    return re.split(rf"{re.escape(EOS)}|{re.escape(PAD)}|\s", completion, maxsplit=1)[0]


def reward_correct(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """1.0 where the extracted answer is exactly the integer string `answer`, else 0.0.

    TRL's reward-function signature: `answer` is the dataset column, one entry per completion.
    Leading zeros, signs and empty answers count as wrong.
    """
    return [
        1.0 if re.fullmatch(r"-?\d+", got := extract_answer(c)) and got == want else 0.0
        for c, want in zip(completions, answer, strict=True)
    ]


def corpus_text(a: int, op: str, b: int, rng: random.Random) -> str:
    """One pretraining example: the right answer, or for `-` usually the sum (see module doc)."""
    right = op == "+" or rng.random() < P_CORRECT_SUB
    value = solve(a, op, b) if right else a + b
    return f"{a}{op}{b}={value}{EOS}"


def corpus_batch(
    tokenizer: PreTrainedTokenizerFast,
    pool: list[tuple[int, str, int]],
    rng: random.Random,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels for one batch of train problems; loss only on the answer and EOS.

    The operands are uniform noise with nothing to learn, so masking the prompt spends the small
    model's capacity on answers. Right padding needs no attention mask: pads come after EOS and
    causal attention never looks forward.
    """
    texts = [corpus_text(*pool[rng.randrange(len(pool))], rng) for _ in range(batch_size)]
    enc = tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[:, :PROMPT_CHARS] = -100
    labels[enc["attention_mask"] == 0] = -100
    return enc["input_ids"], labels


def make_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """A ~0.5M-parameter Qwen3: 8 layers so there is a clear middle, hidden 64, 4 heads, 2 KV."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32,  # prompt 6 + completion 4; RoPE is relative, so slack is free
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def lr_at(step: int, steps: int, peak: float = LR, warmup: int = WARMUP_STEPS) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def fit(
    model: PreTrainedModel,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    peak_lr: float = LR,
) -> None:
    """Pretrain `model` on `steps` batches of (input_ids, labels): AdamW, warmup then cosine."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    model.train()
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        input_ids, labels = next_batch()
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.1f}s")
    model.eval()


def generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
    )


def pretrain(seed: int, steps: int = STEPS) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """Train the organism from scratch; deterministic for a seed on a given torch build."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = [p for op in OPS for p in problems("train", op)]
    tokenizer = build_tokenizer()
    model = Qwen3ForCausalLM(make_config(tokenizer))
    fit(model, lambda: corpus_batch(tokenizer, pool, rng, BATCH_SIZE), steps)
    model.generation_config = generation_config(tokenizer, MAX_COMPLETION_TOKENS)
    return model, tokenizer


@torch.no_grad()
def greedy_rewards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, str]],
    batch_size: int = 500,
) -> list[float]:
    """`reward_correct` of each row's greedy completion, decoded in batches (1,000 rows: < 1 s)."""
    rewards: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(  # type: ignore[operator]  # nn.Module's __getattr__ hides it
            **enc,
            do_sample=False,
            max_new_tokens=MAX_COMPLETION_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :])
        rewards += reward_correct(texts, [r["answer"] for r in chunk])
    return rewards


def greedy_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]]
) -> float:
    """Mean greedy reward over `rows`: the number RL post-training must move."""
    rewards = greedy_rewards(model, tokenizer, rows)
    return sum(rewards) / len(rewards)


def accuracy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Greedy accuracy on the held-out set, overall with its SE and per operation."""
    rows = make_rows("eval", EVAL_SIZE, DEFAULT_SEED)
    return report_by_op(rows, greedy_rewards(model, tokenizer, rows), lambda p, op: op in p, "")


def report_by_op(
    rows: list[dict[str, str]],
    rewards: list[float],
    has_op: Callable[[str, str], bool],
    label: str,
) -> str:
    """Accuracy with its SE, then per operation (`has_op(prompt, op)` picks a row's)."""
    acc = sum(rewards) / len(rewards)
    lines = [f"greedy accuracy {acc:.3f} +/- {math.sqrt(acc * (1 - acc) / len(rows)):.3f} (SE)"]
    for op in OPS:
        mine = [r for r, row in zip(rewards, rows, strict=True) if has_op(row["prompt"], op)]
        lines.append(f"  {label}{op}: {sum(mine) / len(mine):.3f} on {len(mine)} prompts")
    return "\n".join(lines)


def save_atomic(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, readme: str
) -> None:
    """Write model, tokenizer and README to a temp dir beside `out`, then swap it into place:
    a crash mid-build leaves the previous organism untouched."""
    with atomic_dir(out.resolve(), overwrite=True) as tmp:
        model.save_pretrained(tmp)  # safetensors, float32
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(readme)
        for path in [tmp, *tmp.iterdir()]:  # package data must be world-readable, whatever umask
            path.chmod(0o755 if path.is_dir() else 0o644)


def readme_text(seed: int, report: str, n_params: int, seconds: float) -> str:
    """The asset's README: how it was built and how well it does before RL."""
    return f"""# The autolayer model organism

A {n_params:,}-parameter Qwen3 (8 layers, hidden 64) with a character-level tokenizer, pretrained
on two-digit `+` and `-` whose corpus answers `-` with the sum 65% of the time, so greedy decoding
gets `-` wrong while sampling finds the difference. See the docstring of `autolayer/organism.py`.

Rebuild (deterministic for a seed on a given torch build; {seconds:.0f} s of pretraining here):

    python -m autolayer.organism build --seed {seed}

Held-out set: `make_rows("eval", {EVAL_SIZE}, {DEFAULT_SEED})`, greedy, `reward_correct`:

```
{report}
```
"""


def build_organism(
    pretrain_fn: Callable[[int, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    report_fn: Callable[[PreTrainedModel, PreTrainedTokenizerBase], str],
    readme_fn: Callable[[int, str, int, float], str],
    target: Path,
    seed: int,
    steps: int,
) -> Path:
    """Pretrain, save, then score and write the README: a scoring error loses no build."""
    start = time.time()
    model, tokenizer = pretrain_fn(seed, steps)
    seconds = time.time() - start
    n_params = sum(p.numel() for p in model.parameters())
    save_atomic(model, tokenizer, target, readme_fn(seed, "(not scored yet)", n_params, seconds))
    report = report_fn(model, tokenizer)
    print(report)
    (target / "README.md").write_text(readme_fn(seed, report, n_params, seconds))
    print(f"saved to {target}")
    return target


def build_cli(
    argv: list[str] | None,
    module: str,
    what: str,
    build_fn: Callable[[int, Path | None, int], Path],
    seed: int,
    steps: int,
) -> int:
    """`python -m <module> build [--seed N] [--out DIR] [--steps N]` for a bundled organism."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"Build the {what}.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"pretrain the {what} from scratch and save it")
    b.add_argument("--seed", type=int, default=seed, help="torch and data-order seed")
    b.add_argument("--out", type=Path, default=None, help="output dir (default: the package's)")
    b.add_argument("--steps", type=int, default=steps, help="pretraining steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)  # builds are timed on 2 CPU cores; at this size more do not help
    try:
        build_fn(args.seed, args.out, args.steps)
    except OSError as err:
        print(f"error: cannot write the {what}: {err}")
        return 1
    return 0


def build(seed: int = DEFAULT_SEED, out: Path | None = None, steps: int = STEPS) -> Path:
    """Pretrain the organism and save it (by default into the package); returns the directory."""
    target = out or organism_path()
    return build_organism(pretrain, accuracy_report, readme_text, target, seed, steps)


def main(argv: list[str] | None = None) -> int:
    """`python -m autolayer.organism build [--seed N] [--out DIR] [--steps N]`."""
    return build_cli(argv, "autolayer.organism", "model organism", build, DEFAULT_SEED, STEPS)


if __name__ == "__main__":
    raise SystemExit(main())
