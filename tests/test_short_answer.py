"""Short-answer tasks: deterministic disjoint splits, few-shot prompts, rewards on literal text."""

from __future__ import annotations

import re
from typing import Any

import pytest

from autolayer import short_answer
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError
from autolayer.short_answer import CATEGORIES, TASKS, answer_of, make_rows, short_answer_correct
from autolayer.tasks import for_tokenizer, load_task, prompt_text, transcript


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_are_deterministic_and_the_splits_share_no_question(name: str) -> None:
    train = make_rows(name, "train", 100, 0)
    held_out = make_rows(name, "eval", 100, 0)
    assert make_rows(name, "eval", 100, 0) == held_out
    assert make_rows(name, "eval", 100, 1) != held_out  # the seed draws another sample
    asked = {r["question"] for r in train}
    assert len(asked) == 100 and len({r["question"] for r in held_out}) == 100
    assert not asked & {r["question"] for r in held_out}
    shots = {q for q, _ in TASKS[name].shots}
    assert not shots & (asked | {r["question"] for r in held_out})


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_prompt_is_the_two_worked_examples_then_the_question(name: str) -> None:
    row = make_rows(name, "eval", 1, 0)[0]
    (q1, a1), (q2, a2) = TASKS[name].shots
    assert row["prompt"] == [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": a2},
        {"role": "user", "content": row["question"]},
    ]


def test_larger_of_two_answers_the_larger_number_in_either_place() -> None:
    rows = make_rows("larger_of_two", "train", 2000, 0)
    for row in rows:
        a, b = map(int, re.findall(r"\d+", row["question"]))
        assert row["answer"] == str(max(a, b))
    first = sum(row["answer"] == re.findall(r"\d+", row["question"])[0] for row in rows)
    assert 0.45 < first / len(rows) < 0.55  # "the first number" is a coin flip
    shots = TASKS["larger_of_two"].shots  # one example answers with each place
    assert [q.index(a) < q.index(" or ") for q, a in shots] == [False, True]


def test_next_number_adds_one_and_an_example_shows_the_carry() -> None:
    for row in make_rows("next_number", "train", 500, 0):
        assert int(row["answer"]) == int(re.findall(r"\d+", row["question"])[0]) + 1
    assert TASKS["next_number"].shots[1] == ("What number comes right after 599?", "600")


def test_category_pick_has_one_word_of_the_category_and_rotates_its_place() -> None:
    rows = make_rows("category_pick", "train", 2000, 0)
    places = []
    for row in rows:
        category = re.match(r"Which one is (an? \w+):", row["question"]).group(1)  # type: ignore[union-attr]
        options = short_answer._options(row["question"])
        assert [w in CATEGORIES[category] for w in options].count(True) == 1
        places.append(options.index(row["answer"]))
    assert all(0.28 < places.count(i) / len(places) < 0.38 for i in range(3))


def test_an_antonym_pair_is_held_out_both_ways_or_not_at_all() -> None:
    def pairs(split: str) -> set[frozenset[str]]:
        rows = make_rows("antonym", split, 1000, 0)
        return {frozenset((r["question"].split('"')[1], r["answer"])) for r in rows}

    train, held_out = pairs("train"), pairs("eval")
    assert not train & held_out
    assert len(train) + len(held_out) == len(short_answer.ANTONYMS) - 2  # the examples' pairs
    assert all(len(make_rows("antonym", s, 1000, 0)) == 2 * len(p) for s, p in
               (("train", train), ("eval", held_out)))  # fmt: skip


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        (" 86\n", "86", 1.0),
        ("86 is larger", "86", 1.0),
        ("31", "86", 0.0),
        ("The answer is 86", "86", 0.0),  # the answer must come first, as the examples show
        ("860", "86", 0.0),
        ("", "86", 0.0),
        (" Apple.", "apple", 1.0),  # a word matches whatever its case
        ("apples", "apple", 0.0),
        ([{"role": "assistant", "content": "bus"}], "bus", 1.0),  # TRL's chat completion
    ],
)
def test_reward_on_literal_completions(completion: Any, answer: str, reward: float) -> None:
    assert short_answer_correct([completion], [answer]) == [reward]


def test_answer_of_takes_the_first_number_or_word() -> None:
    assert [answer_of(t) for t in (" -5 apples", "x 7", "  ", None)] == ["-5", "x", None, None]


def test_the_shortcuts_answer_as_named() -> None:
    larger = TASKS["larger_of_two"].shortcuts
    question = "Which number is larger, 31 or 86?"
    assert (larger["the first number"](question), larger["the second number"](question)) == (
        "31",
        "86",
    )
    options = TASKS["category_pick"].shortcuts
    question = "Which one is a fruit: hammer, blue or apple?"
    assert [f(question) for f in options.values()] == ["hammer", "blue", "apple"]
    copy = TASKS["antonym"].shortcuts["the word itself"]
    assert copy('What is the opposite of "hot"?') == "hot"


class BaseTokenizer:
    """A tokenizer with no chat template that starts every text with its BOS token."""

    chat_template = None
    bos_token, bos_token_id = "<bos>", 2

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [2, *(ord(c) for c in text)]}


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_a_base_model_reads_the_examples_as_a_q_and_a_transcript() -> None:
    task = load_task(TaskConfig(name="larger_of_two", eval_size=4, train_size=8))
    assert (task.max_completion_length, task.stop_strings, task.chat_template) == (
        8,
        ("\n",),
        "auto",
    )
    plain = for_tokenizer(task, BaseTokenizer())
    question = task.eval[0]["question"]
    assert plain.eval[0]["prompt"] == (
        "<bos>Q: Which number is larger, 31 or 86?\nA: 86\n\n"
        f"Q: Which number is larger, 72 or 45?\nA: 72\n\nQ: {question}\nA:"
    )
    assert plain.train[0]["prompt"].startswith("<bos>Q: ")
    chat = for_tokenizer(task, ChatTokenizer())  # a chat model gets the turns
    assert prompt_text(chat.eval[0]["prompt"], ChatTokenizer()).endswith(
        f"<user>{question}<assistant>"
    )


def test_transcript_puts_a_system_message_first() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert transcript(messages) == "Be brief.\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"


def test_an_eval_size_beyond_the_held_out_problems_is_refused() -> None:
    with pytest.raises(AutolayerError, match="held-out split has only"):
        load_task(TaskConfig(name="category_pick", eval_size=100_000, train_size=8))
