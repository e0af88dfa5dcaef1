"""The code organism's task data: one-line Python functions with tests, split train/eval.

A prompt is the head of a function whose docstring says what to return (`plus`, `minus`,
`times`, `max` or `min` of the argument and a number 2-99; the argument's name varies), and the
row's `test` holds three asserts the completion must pass in the sandbox
(`autolayer.coding.passes_tests`). Train and eval problems are disjoint: a stable hash of
operation, argument and number puts 1 in `EVAL_BUCKETS` in eval. The model trained on these is
`autolayer.code_organism`; the `code_organism` built-in task reads its rows from here.
"""

from __future__ import annotations

import random
import zlib

ARGS = ("x", "n", "a", "v")
OPS = ("plus", "minus", "times", "max", "min")
NUMBERS = range(2, 100)
EVAL_BUCKETS = 5  # ~390 of the 1,960 problems are held out
TRAIN_SIZE = 4096
EVAL_SIZE = 300  # SE of an accuracy near 0.6 is sqrt(.6*.4/300) = 2.8 points


def prompt(arg: str, op: str, number: int) -> str:
    return f'def f({arg}):\n  "{arg} {op} {number}"\n  return '


def body(arg: str, op: str, number: int) -> str:
    """The right expression for the docstring."""
    symbol = {"plus": "+", "minus": "-", "times": "*"}.get(op)
    return f"{arg} {symbol} {number}" if symbol else f"{op}({arg}, {number})"


def solve(op: str, x: int, number: int) -> int:
    return {
        "plus": x + number,
        "minus": x - number,
        "times": x * number,
        "max": max(x, number),
        "min": min(x, number),
    }[op]


def checks(arg: str, op: str, number: int) -> str:
    """Three asserts that tell every operation apart: inputs below, at and above the number."""
    xs = (max(0, number - 5), number + 3, 1)
    return "\n".join(f"assert f({x}) == {solve(op, x, number)}" for x in xs)


def is_eval(arg: str, op: str, number: int) -> bool:
    return zlib.crc32(f"{arg}{op}{number}".encode()) % EVAL_BUCKETS == 0


def problems(split: str) -> list[tuple[str, str, int]]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [
        (arg, op, n)
        for op in OPS
        for arg in ARGS
        for n in NUMBERS
        if is_eval(arg, op, n) == (split == "eval")
    ]


def make_rows(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows `{"prompt", "test"}`, cycling through a seeded shuffle of the split's problems."""
    pool = problems(split)
    random.Random(f"{split}-{seed}").shuffle(pool)
    return [
        {"prompt": prompt(*pool[i % len(pool)]), "test": checks(*pool[i % len(pool)])}
        for i in range(n)
    ]
