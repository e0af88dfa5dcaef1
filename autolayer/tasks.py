"""Tasks: prompt datasets with verifiable rewards, shared by the proxy RL loop, the scorer and TRL.

A task is a train set, a held-out eval set in a fixed order, and reward functions with TRL's
signature `f(completions, **columns) -> list[float]`, where each dataset column other than
`prompt` arrives as a list aligned with `completions`. Two tasks ship: `organism` (the bundled
model's two-digit arithmetic, see `autolayer.organism`) and `gsm8k` (grade-school math word
problems whose answers end in `#### <final answer>`, checked with math-verify).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from math_verify import parse, verify

from autolayer import organism
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError

RewardFunc = Callable[..., list[float]]

GSM8K_HUB_ID = "openai/gsm8k"  # used when task.path is not given (needs network)
GSM8K_SAMPLE = Path(__file__).resolve().parent / "assets" / "gsm8k_sample.jsonl"  # 65 rows
GSM8K_PROMPT = (
    "Question: {question}\nAnswer step by step, then give the final answer after '####'.\nAnswer:"
)
GSM8K_MAX_COMPLETION_TOKENS = 256  # TRL's default; GSM8K worked answers are ~100-200 tokens
GSM8K_STOP = ("\nQuestion:",)  # a base model answering the plain prompt goes on to a new question
ORGANISM_TRAIN_SIZE = 4096
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Task:
    name: str
    train: datasets.Dataset  # column `prompt` (str) plus the columns the reward functions read
    eval: datasets.Dataset  # the same columns; held out, in a fixed order
    reward_funcs: tuple[RewardFunc, ...]
    max_completion_length: int  # tokens per completion
    stop_strings: tuple[str, ...] = ()


class RewardError(RuntimeError):
    """A reward function raised or returned the wrong number of rewards; the message names it."""


def load_task(config: TaskConfig, tokenizer: Any = None) -> Task:
    """Build the task `config.name`; a tokenizer with a chat template wraps the prompts in it."""
    loaders: dict[str, Callable[[TaskConfig, Any], Task]] = {
        "organism": _load_organism,
        "gsm8k": _load_gsm8k,
    }
    if config.name not in loaders:
        raise AutolayerError(
            f"unknown task '{config.name}'; valid tasks: {', '.join(sorted(loaders))}"
        )
    return loaders[config.name](config, tokenizer)


def score_completions(
    task: Task, prompts: list[str], completions: list[str], rows: dict[str, list[Any]]
) -> list[float]:
    """Per-completion sum of the task's rewards, as TRL sums reward functions (all weights 1).

    `rows` maps each non-prompt column to a list aligned with `completions`. A reward of `None`
    means "not applicable" and adds 0, as TRL's nansum over reward functions does.
    """
    for column, values in rows.items():
        if len(values) != len(completions):
            raise ValueError(
                f"column '{column}' has {len(values)} values for {len(completions)} completions"
            )
    totals = [0.0] * len(completions)
    for func in task.reward_funcs:
        name = getattr(func, "__name__", type(func).__name__)
        try:
            rewards = func(prompts=prompts, completions=completions, **rows)
        except Exception as err:
            raise RewardError(
                f"reward function '{name}' raised {type(err).__name__}: {err}"
            ) from err
        if rewards is None or len(rewards) != len(completions):
            got = "None" if rewards is None else f"{len(rewards)} rewards"
            raise RewardError(
                f"reward function '{name}' returned {got} for {len(completions)} completions"
            )
        totals = [
            t + (0.0 if r is None else float(r)) for t, r in zip(totals, rewards, strict=True)
        ]
    return totals


def repeat_rows(batch: dict[str, list[Any]], times: int) -> dict[str, list[Any]]:
    """Each row repeated `times` in place (prompt-major: a a b b), for G samples per prompt."""
    if times < 1:
        raise ValueError(f"times must be at least 1, got {times}")
    return {key: [v for v in values for _ in range(times)] for key, values in batch.items()}


# --- organism ---------------------------------------------------------------------------------


def _load_organism(config: TaskConfig, tokenizer: Any) -> Task:
    """The bundled model's arithmetic; its prompts are raw `ab+cd=` with no chat template."""
    train = organism.make_rows("train", config.train_size or ORGANISM_TRAIN_SIZE, config.seed)
    eval_ = organism.make_rows("eval", config.eval_size or organism.EVAL_SIZE, config.seed)
    return Task(
        name="organism",
        train=datasets.Dataset.from_list(train),
        eval=datasets.Dataset.from_list(eval_),
        reward_funcs=(organism.reward_correct,),
        max_completion_length=config.max_completion_length or organism.MAX_COMPLETION_TOKENS,
    )


# --- gsm8k ------------------------------------------------------------------------------------


def _load_gsm8k(config: TaskConfig, tokenizer: Any) -> Task:
    """GSM8K-format data from a local file or directory, or from the hub (`task.path`)."""
    path = config.path or GSM8K_HUB_ID
    splits = _read_gsm8k(path)
    if "test" in splits:
        train, eval_ = splits["train"], splits["test"]
    else:
        held_out = splits["train"].train_test_split(
            test_size=config.eval_fraction, seed=config.seed
        )
        train, eval_ = held_out["train"], held_out["test"]
    chat = _has_chat_template(tokenizer)
    return Task(
        name="gsm8k",
        train=_gsm8k_rows(_head(train, config.train_size), tokenizer, path),
        eval=_gsm8k_rows(_head(eval_, config.eval_size), tokenizer, path),
        reward_funcs=(gsm8k_correct,),
        max_completion_length=config.max_completion_length or GSM8K_MAX_COMPLETION_TOKENS,
        stop_strings=() if chat else GSM8K_STOP,
    )


def _read_gsm8k(path: str) -> datasets.DatasetDict:
    """A `train` split, plus `test` when the source has one; checks the GSM8K columns."""
    local = Path(path).expanduser()
    data: Any
    if local.suffix in LOCAL_SUFFIXES:
        if not local.is_file():
            raise AutolayerError(f"task.path {path} does not exist")
        data = datasets.load_dataset(LOCAL_SUFFIXES[local.suffix], data_files=str(local))
    elif local.is_dir():
        if (local / "dataset_dict.json").is_file():  # written by DatasetDict.save_to_disk
            data = datasets.load_from_disk(str(local))
        else:
            data = datasets.load_dataset(str(local))
    else:
        data = _load_hub(path)
    if not isinstance(data, datasets.DatasetDict) or "train" not in data:
        raise AutolayerError(f"the gsm8k data at {path} has no 'train' split")
    columns = set.intersection(*(set(split.column_names) for split in data.values()))
    missing = [c for c in ("question", "answer") if c not in columns]
    if missing:
        raise AutolayerError(
            f"the gsm8k data at {path} lacks the column(s) {', '.join(missing)}; "
            "it needs 'question' and 'answer' (worked solution ending in '#### <final answer>')"
        )
    return data


def _load_hub(path: str) -> Any:
    """GSM8K's `main` configuration from the Hugging Face hub."""
    try:
        return datasets.load_dataset(path, "main")
    except (ConnectionError, FileNotFoundError) as err:  # offline, or no such dataset
        raise AutolayerError(
            f"could not load the dataset '{path}' from the Hugging Face hub "
            f"({type(err).__name__}); pass a local .jsonl or .parquet file as task.path"
        ) from err


def _head(split: datasets.Dataset, size: int | None) -> datasets.Dataset:
    """The first `size` rows (all when None), so truncation is deterministic."""
    return split if size is None else split.select(range(min(size, len(split))))


def _gsm8k_rows(split: datasets.Dataset, tokenizer: Any, path: str) -> datasets.Dataset:
    """Columns `prompt`, `question` and `answer` (the final answer only)."""
    questions = list(split["question"])
    solutions = list(split["answer"])
    return datasets.Dataset.from_dict(
        {
            "prompt": [gsm8k_prompt(q, tokenizer) for q in questions],
            "question": questions,
            "answer": [_gold_answer(s, i, path) for i, s in enumerate(solutions)],
        }
    )


def _gold_answer(solution: str, row: int, path: str) -> str:
    try:
        return gsm8k_final_answer(solution)
    except ValueError:
        raise AutolayerError(
            f"row {row} of the gsm8k data at {path} has no '#### <final answer>' line"
        ) from None


def gsm8k_final_answer(solution: str) -> str:
    """The text after the last `####` of a worked solution, commas stripped (`1,234` -> `1234`)."""
    if "####" not in solution:
        raise ValueError("no '####' in the solution")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_prompt(question: str, tokenizer: Any = None) -> str:
    """The instruction prompt, inside the chat template when the tokenizer has one.

    Instruct models are fine-tuned on their chat format and answer a bare prompt poorly, so a
    chat template, when present, is applied with the assistant turn opened.
    """
    text = GSM8K_PROMPT.format(question=question)
    if not _has_chat_template(tokenizer):
        return text
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    )


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# --- gsm8k reward -----------------------------------------------------------------------------

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


def gsm8k_extract(completion: str) -> str | None:
    """The final answer of a completion, or None.

    Text from a stop string on is dropped first: a base model that was not stopped goes on to
    invent and answer a new question. Then looks, in order, after the last `####`, in the last
    `\\boxed{}`, then in the whole text; takes the first number or fraction after `####`, the last
    one elsewhere.
    """
    for stop in GSM8K_STOP:
        completion = completion.split(stop, 1)[0]
    if "####" in completion:
        found = _FINAL.findall(completion.rsplit("####", 1)[1])
        return found[0] if found else None
    boxed = _BOXED.findall(completion)
    found = _FINAL.findall(boxed[-1] if boxed else completion)
    return found[-1] if found else None


def gsm8k_correct(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """1.0 where the completion's final answer equals `answer` by math-verify, else 0.0.

    Equivalent forms count (`3/4` for `0.75`, `1,234` for `1234`, `42.0` for `42`). Junk never
    raises: no answer, an unparsable one or a math-verify error scores 0.0.
    """
    return [_is_correct(c, a) for c, a in zip(completions, answer, strict=True)]


def _is_correct(completion: str, gold: str) -> float:
    try:  # junk of any type (even a non-string completion) scores 0 rather than ending the run
        pred, want = gsm8k_extract(completion), gsm8k_extract(str(gold))
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
