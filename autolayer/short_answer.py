"""Short-answer tasks for real pretrained models: one number or word, after two worked examples.

A short answer keeps completions to a few tokens (`MAX_COMPLETION_TOKENS`), so GRPO moves a
135M-270M model within minutes on one CPU core. Each prompt shows two worked examples first
(few-shot): asked for "the number only" without them, SmolLM2-135M-Instruct explains instead,
and RL with short completions then learns the format, which every layer learns alike. The two
examples differ in what a trivial policy would copy (the first number, one option letter), so
the format does not suggest a shortcut.

A prompt is a list of chat messages: the examples as user/assistant turns, then the question. A
chat model reads it through its chat template; a model without one (Gemma 3 270M is the
pretrained base model) reads the same turns as a "Q: ... A: ..." transcript
(`autolayer.tasks.transcript`). Generation stops at a newline either way.

Splits: a crc32 bucket of the question holds 1 in 5 problems out for `eval`, as
`chat_arithmetic_rows` does, so train and held-out never share a question (an antonym pair's two
directions share a bucket); the examples are in neither.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_COMPLETION_TOKENS = 8  # an answer of up to 4 digits or one word, and its end
STOP = ("\n",)  # a base model goes on with the next "Q:" line after its answer
_ANSWER = re.compile(r"-?\d+|[^\W\d_]+")  # the first number or word of a completion

Problem = tuple[str, str]  # (question, answer)


Shortcut = Callable[[str], str]  # a question -> the answer a trivial policy gives


@dataclass(frozen=True)
class ShortAnswer:
    """A short-answer task: every problem it can ask, the worked examples shown first, and the
    shortcuts a policy could learn instead of the skill (a gain only counts above them)."""

    summary: str
    problems: Callable[[], list[Problem]]  # all of them, in a fixed order
    shots: tuple[Problem, Problem]  # shown before every question; never asked
    shortcuts: dict[str, Shortcut] = field(default_factory=dict)
    # Problems with the same key go to the same split (default: the question itself)
    split_key: Callable[[str, str], str] = lambda question, answer: question
    eval_share: int = 5  # 1 in `eval_share` keys is held out


def _numbers(question: str) -> list[str]:
    return re.findall(r"-?\d+", question)


def _quoted(question: str) -> str:
    return question.split('"')[1]


def _options(question: str) -> list[str]:
    """The words offered after the colon of "Which one is ...: a, b or c?"."""
    return re.split(r", | or ", question.split(": ", 1)[-1].rstrip("?"))


def larger_of_two() -> list[Problem]:
    """Which of two different two-digit numbers is larger; each pair in both orders."""
    return [
        (f"Which number is larger, {a} or {b}?", str(max(a, b)))
        for a in range(10, 100)
        for b in range(10, 100)
        if a != b
    ]


def next_number() -> list[Problem]:
    """The number right after n, for n from 10 to 998 (a carry in one of every ten)."""
    return [(f"What number comes right after {n}?", str(n + 1)) for n in range(10, 999)]


# Five categories of ten everyday words, none in two categories.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "an animal": (
        "dog", "horse", "tiger", "rabbit", "sheep", "eagle", "lion", "mouse", "cow", "frog",
    ),
    "a fruit": (
        "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon",
    ),
    "a color": (
        "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
    ),
    "a vehicle": (
        "car", "bus", "truck", "train", "bicycle", "boat", "plane", "taxi", "tram", "van",
    ),
    "a tool": (
        "hammer", "saw", "wrench", "drill", "shovel", "pliers", "axe", "chisel", "rake", "spanner",
    ),
}  # fmt: skip


def category_pick() -> list[Problem]:
    """Which of three words belongs to a category; the other two come from two other ones.

    Drawn with a fixed seed: 3,000 distinct questions, the answer's place uniform over the three.
    """
    rng = random.Random("category-pick")
    names = sorted(CATEGORIES)
    seen: dict[str, str] = {}
    while len(seen) < 3000:
        wanted, *others = rng.sample(names, 3)
        words = [rng.choice(CATEGORIES[wanted])] + [rng.choice(CATEGORIES[o]) for o in others]
        right, rest = words[0], words[1:]
        rng.shuffle(rest)
        position = rng.randrange(3)  # the answer's place, each equally likely
        words = [*rest[:position], right, *rest[position:]]
        question = f"Which one is {wanted}: {words[0]}, {words[1]} or {words[2]}?"
        seen.setdefault(question, right)
    return list(seen.items())


# Pairs whose opposite is unambiguous both ways (not "short": long or tall; not "old": new or
# young), written for this project.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("rich", "poor"), ("early", "late"),
    ("full", "empty"), ("wet", "dry"), ("high", "low"), ("strong", "weak"), ("thick", "thin"),
    ("loud", "quiet"), ("clean", "dirty"), ("day", "night"), ("black", "white"), ("buy", "sell"),
    ("push", "pull"), ("in", "out"), ("true", "false"), ("good", "bad"), ("love", "hate"),
    ("alive", "dead"), ("above", "below"), ("inside", "outside"), ("before", "after"),
    ("always", "never"), ("cheap", "expensive"), ("deep", "shallow"), ("east", "west"),
    ("north", "south"), ("friend", "enemy"), ("near", "far"), ("remember", "forget"),
    ("wide", "narrow"), ("asleep", "awake"), ("boy", "girl"), ("brother", "sister"),
    ("king", "queen"), ("man", "woman"), ("husband", "wife"), ("father", "mother"),
    ("son", "daughter"), ("uncle", "aunt"), ("summer", "winter"), ("sunrise", "sunset"),
    ("top", "bottom"), ("front", "back"), ("inner", "outer"), ("upper", "lower"),
    ("minimum", "maximum"), ("major", "minor"), ("entrance", "exit"), ("import", "export"),
    ("increase", "decrease"), ("accept", "reject"), ("add", "subtract"), ("multiply", "divide"),
    ("borrow", "lend"), ("float", "sink"), ("freeze", "melt"), ("laugh", "cry"),
    ("lead", "follow"), ("pass", "fail"), ("rise", "fall"), ("teach", "learn"),
    ("appear", "disappear"), ("war", "peace"), ("life", "death"), ("success", "failure"),
    ("victory", "defeat"), ("ancient", "modern"), ("polite", "rude"), ("guilty", "innocent"),
    ("wise", "foolish"), ("rough", "smooth"), ("tight", "loose"), ("positive", "negative"),
    ("plus", "minus"), ("vertical", "horizontal"), ("past", "future"), ("forward", "backward"),
    ("tame", "wild"), ("heaven", "hell"), ("question", "answer"), ("male", "female"),
    ("odd", "even"), ("mountain", "valley"), ("sun", "moon"), ("hero", "villain"),
    ("cause", "effect"), ("input", "output"), ("yes", "no"), ("on", "off"), ("ceiling", "floor"),
    ("dawn", "dusk"), ("student", "teacher"), ("parent", "child"), ("temporary", "permanent"),
    ("public", "private"), ("optimist", "pessimist"), ("junior", "senior"),
    ("interior", "exterior"), ("ascend", "descend"), ("include", "exclude"),
    ("internal", "external"), ("arrival", "departure"), ("winner", "loser"), ("buyer", "seller"),
    ("employer", "employee"), ("host", "guest"), ("predator", "prey"), ("dense", "sparse"),
    ("majority", "minority"), ("natural", "artificial"), ("offense", "defense"),
    ("rural", "urban"), ("abundant", "scarce"), ("first", "last"), ("whisper", "shout"),
)  # fmt: skip


def antonyms() -> list[Problem]:
    """The opposite of a word, each pair asked both ways."""
    return [
        (f'What is the opposite of "{word}"?', opposite)
        for pair in ANTONYMS
        for word, opposite in (pair, pair[::-1])
    ]


def _pair(question: str, answer: str) -> str:
    """Both directions of an antonym pair share a split: one way must not teach the other."""
    return "/".join(sorted((_quoted(question), answer)))


TASKS: dict[str, ShortAnswer] = {
    "larger_of_two": ShortAnswer(
        "which of two two-digit numbers is larger, number only (comparison)",
        larger_of_two,
        shots=(
            ("Which number is larger, 31 or 86?", "86"),
            ("Which number is larger, 72 or 45?", "72"),
        ),
        shortcuts={
            "the first number": lambda q: _numbers(q)[0],
            "the second number": lambda q: _numbers(q)[-1],
        },
    ),
    "next_number": ShortAnswer(
        "the number right after a two- or three-digit number, number only (counting)",
        next_number,
        shots=(
            ("What number comes right after 38?", "39"),
            ("What number comes right after 599?", "600"),
        ),
        shortcuts={"the number itself": lambda q: _numbers(q)[0]},
    ),
    "category_pick": ShortAnswer(
        "which of three words is an animal, a fruit, a color, a vehicle or a tool, one word "
        "(multiple choice)",
        category_pick,
        shots=(
            ("Which one is a fruit: hammer, blue or apple?", "apple"),
            ("Which one is a vehicle: bus, lion or drill?", "bus"),
        ),
        shortcuts={
            "the first option": lambda q: _options(q)[0],
            "the second option": lambda q: _options(q)[1],
            "the third option": lambda q: _options(q)[-1],
        },
    ),
    "antonym": ShortAnswer(
        "the opposite of a word, one word (word relations; a fixed list of 118 pairs)",
        antonyms,
        shots=(
            ('What is the opposite of "wet"?', "dry"),
            ('What is the opposite of "below"?', "above"),
        ),
        shortcuts={"the word itself": _quoted},
        split_key=_pair,
        eval_share=2,  # half the pairs: about 120 held-out questions
    ),
}


def held_out(key: str, share: int = 5) -> bool:
    """One key in `share`, by a crc32 bucket: the held-out split's part."""
    return zlib.crc32(key.encode()) % share == 0


def few_shot(shots: tuple[Problem, ...], question: str) -> list[dict[str, str]]:
    """The worked examples as user/assistant turns, then `question`."""
    turns = [
        turn
        for asked, answered in shots
        for turn in ({"role": "user", "content": asked}, {"role": "assistant", "content": answered})
    ]
    return [*turns, {"role": "user", "content": question}]


def make_rows(name: str, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows (fewer if the split has fewer problems) of task `name`: prompt, question, answer."""
    task = TASKS[name]
    shown = {task.split_key(q, a) for q, a in task.shots}
    pool = [
        (q, a)
        for q, a in task.problems()
        if (key := task.split_key(q, a)) not in shown
        and held_out(key, task.eval_share) == (split == "eval")
    ]
    chosen = random.Random(f"{name}-{split}-{seed}").sample(pool, min(n, len(pool)))
    return [{"prompt": few_shot(task.shots, q), "question": q, "answer": a} for q, a in chosen]


def answer_of(completion: Any) -> str | None:
    """The first number or word of a completion (text, or TRL's assistant message)."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content", "")
    found = _ANSWER.search(completion) if isinstance(completion, str) else None
    return found.group(0) if found else None


def short_answer_correct(
    completions: list[Any], answer: list[str], **kwargs: object
) -> list[float]:
    """1.0 where the completion's first number or word is the answer (case aside), else 0.0."""
    return [
        1.0 if (got := answer_of(c)) is not None and got.lower() == str(a).lower() else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]
