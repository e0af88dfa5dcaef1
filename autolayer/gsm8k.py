"""Math in GSM8K's format: the prompt, the final-answer extraction and a math-verify reward.

A GSM8K row has a `question` and a worked `answer` ending in `#### <final answer>`. The built-in
`gsm8k` task (`autolayer.builtin_tasks.BUILTINS`) reads such rows from the hub (`openai/gsm8k`) or
from local files, keeps the final answer in `answer`, and scores completions with
`gsm8k_correct`, a TRL-signature reward that any TRL GRPOTrainer can use unchanged.
`assets/gsm8k_format_sample.jsonl` holds problems written for this project in GSM8K's format
for offline tests; they are not GSM8K items.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from math_verify import parse, verify

from autolayer.errors import AutolayerError

HUB_ID = "openai/gsm8k"
FORMAT_SAMPLE = Path(__file__).resolve().parent / "assets" / "gsm8k_format_sample.jsonl"  # 65 rows
PROMPT = (
    "Question: {question}\nAnswer step by step, then give the final answer after '####'.\nAnswer:"
)
MAX_COMPLETION_TOKENS = 256  # TRL's default; GSM8K worked answers are ~100-200 tokens
STOP = ("\nQuestion:",)  # a base model answering the plain prompt goes on to a new question


def prepare(split: datasets.Dataset, source: str) -> datasets.Dataset:
    """Columns `question` and `answer` (the final answer only) from GSM8K-format rows."""
    missing = [c for c in ("question", "answer") if c not in split.column_names]
    if missing:
        raise AutolayerError(
            f"the gsm8k data at {source} lacks the column(s) {', '.join(missing)}; "
            "it needs 'question' and 'answer' (worked solution ending in '#### <final answer>')"
        )
    questions = list(split["question"])
    answers = [_gold_answer(s, i, source) for i, s in enumerate(split["answer"])]
    return datasets.Dataset.from_dict({"question": questions, "answer": answers})


def _gold_answer(solution: str, row: int, source: str) -> str:
    try:
        return final_answer(solution)
    except ValueError:
        raise AutolayerError(
            f"row {row} of the gsm8k data at {source} has no '#### <final answer>' line"
        ) from None


def final_answer(solution: str) -> str:
    """The text after the last `####` of a worked solution, commas stripped (`1,234` -> `1234`)."""
    if "####" not in solution:
        raise ValueError("no '####' in the solution")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


# Only these shapes reach math-verify: a number (`-1,234.5`, thousands grouped by 3) or a plain
# fraction (`3/4`, `\frac{3}{4}`). Sympy can take minutes on `9^{9^{9}}` or `\binom{10^6}{5}`,
# and math-verify's own timeouts are off (see `_verify`), so the inputs themselves must be safe.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_FINAL = re.compile(rf"-?\\d?frac\{{-?\d+\}}\{{\d+\}}|(?:{_NUMBER})(?:\s*/\s*\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # one level of nested braces
_MAX_CHARS = 40  # longer "numbers" are junk; math-verify is never given them

# We call math-verify with its timeouts off, on purpose; silence its one-time warning about it.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(
        lambda record: not record.getMessage().startswith("Timeout is disabled")
    )


def extract(completion: str) -> str | None:
    """The final answer of a completion, or None.

    Text from a stop string on is dropped first: a base model that was not stopped goes on to
    invent and answer a new question. Then looks, in order, after the last `####`, in the last
    `\\boxed{}`, then in the whole text; takes the first number or fraction after `####`, the last
    one elsewhere.
    """
    for stop in STOP:
        completion = completion.split(stop, 1)[0]
    if "####" in completion:
        found = _FINAL.findall(completion.rsplit("####", 1)[1])
        return found[0] if found else None
    boxed = _BOXED.findall(completion)
    found = _FINAL.findall(boxed[-1] if boxed else completion)
    return found[-1] if found else None


def gsm8k_correct(completions: list[Any], answer: list[str], **kwargs: object) -> list[float]:
    """1.0 where the completion's final answer equals `answer` by math-verify, else 0.0.

    Equivalent forms count (`3/4` for `0.75`, `1,234` for `1234`, `42.0` for `42`). Junk never
    raises: no answer, an unparsable one or a math-verify error scores 0.0. A conversational
    completion (TRL's `[{"role": "assistant", "content": ...}]`) is read from its content.
    """
    return [_is_correct(_text(c), a) for c, a in zip(completions, answer, strict=True)]


def _text(completion: Any) -> Any:
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content", "")
    return completion


def _is_correct(completion: str, gold: str) -> float:
    try:  # junk of any type (even a non-string completion) scores 0 rather than ending the run
        pred, want = extract(completion), extract(str(gold))
        if pred is None or want is None or max(len(pred), len(want)) > _MAX_CHARS:
            return 0.0
        return 1.0 if _verify(want, pred) else 0.0
    except Exception:
        return 0.0


@functools.lru_cache(maxsize=8192)
def _verify(gold: str, pred: str) -> bool:
    """math-verify's `verify(parse(gold), parse(pred))` with its signal timeouts turned off.

    Its default timeouts use `signal.alarm`, which raises ValueError outside the main thread and,
    in the main thread, cancels any other SIGALRM timer (pytest-timeout's among them). The inputs
    are short plain numbers (`_FINAL`), which parse and compare in milliseconds.
    """
    return bool(verify(_parse(gold), _parse(pred), timeout_seconds=None, raise_on_error=False))


def _parse(text: str) -> Sequence[Any]:
    """Parse as LaTeX math; `parsing_timeout=None` is math-verify's way to skip the alarm."""
    result: Sequence[Any] = parse(f"${text}$", parsing_timeout=None)
    return result
