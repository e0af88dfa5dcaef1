"""Task loading, the GSM8K reward on literal completions, and reward summing."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import datasets
import pytest

from autolayer import organism
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError
from autolayer.tasks import (
    GSM8K_PROMPT,
    GSM8K_SAMPLE,
    RewardError,
    Task,
    gsm8k_correct,
    gsm8k_extract,
    gsm8k_final_answer,
    gsm8k_prompt,
    load_task,
    repeat_rows,
    score_completions,
)


def gsm8k(**kwargs: Any) -> Task:
    return load_task(TaskConfig(name="gsm8k", path=str(GSM8K_SAMPLE), **kwargs))


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- gsm8k data -------------------------------------------------------------------------------


def test_gsm8k_sample_splits_into_disjoint_train_and_eval() -> None:
    task = gsm8k()
    assert (len(task.train), len(task.eval)) == (52, 13)  # 65 rows, eval_fraction 0.2
    assert set(task.train.column_names) == {"prompt", "question", "answer"}
    assert not set(task.train["question"]) & set(task.eval["question"])
    assert task.reward_funcs == (gsm8k_correct,)
    assert task.max_completion_length == 256
    assert task.stop_strings == ("\nQuestion:",)


def test_gsm8k_split_is_deterministic_for_a_seed() -> None:
    first, again, other = gsm8k(seed=3), gsm8k(seed=3), gsm8k(seed=4)
    assert list(first.eval["question"]) == list(again.eval["question"])
    assert list(first.train["question"]) == list(again.train["question"])
    assert list(first.eval["question"]) != list(other.eval["question"])


def test_gsm8k_sizes_truncate_to_the_first_rows() -> None:
    full, small = gsm8k(), gsm8k(train_size=10, eval_size=5, max_completion_length=64)
    assert list(small.train["question"]) == list(full.train["question"])[:10]
    assert list(small.eval["question"]) == list(full.eval["question"])[:5]
    assert small.max_completion_length == 64


def test_gsm8k_every_sample_answer_is_a_plain_number() -> None:
    task = gsm8k()
    for answer in list(task.train["answer"]) + list(task.eval["answer"]):
        float(answer)  # no commas, no text


def test_gsm8k_columns_from_literal_rows(tmp_path: Path) -> None:
    rows = [
        {"question": f"q{i}", "answer": f"step\n#### {a}", "extra": "x"}
        for i, a in enumerate(["1,234", "42", " 7 ", "-3", "2.5"])
    ]
    task = load_task(TaskConfig(name="gsm8k", path=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    by_question = dict(
        zip(
            list(task.train["question"]) + list(task.eval["question"]),
            list(task.train["answer"]) + list(task.eval["answer"]),
            strict=True,
        )
    )
    assert by_question == {"q0": "1234", "q1": "42", "q2": "7", "q3": "-3", "q4": "2.5"}
    assert task.train[0]["prompt"] == GSM8K_PROMPT.format(question=task.train[0]["question"])
    assert "extra" not in task.train.column_names


def test_gsm8k_final_answer_takes_the_last_marker() -> None:
    assert gsm8k_final_answer("a #### 1\nb\n#### 1,234") == "1234"


def test_gsm8k_prompt_uses_a_chat_template_when_present() -> None:
    class ChatTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
            assert kwargs == {"tokenize": False, "add_generation_prompt": True}
            return f"<user>{messages[0]['content']}<assistant>"

    plain = GSM8K_PROMPT.format(question="2+2?")
    assert gsm8k_prompt("2+2?") == plain
    assert gsm8k_prompt("2+2?", ChatTokenizer()) == f"<user>{plain}<assistant>"


def test_gsm8k_parquet_and_test_split_directory(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(6)]
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    )
    data["train"].to_parquet(str(tmp_path / "train.parquet"))
    task = load_task(TaskConfig(name="gsm8k", path=str(tmp_path / "train.parquet")))
    assert len(task.train) + len(task.eval) == 4
    data.save_to_disk(str(tmp_path / "saved"))
    task = load_task(TaskConfig(name="gsm8k", path=str(tmp_path / "saved")))
    assert list(task.eval["question"]) == ["q4", "q5"]  # the test split, in order
    assert list(task.train["question"]) == ["q0", "q1", "q2", "q3"]


# --- load_task errors -------------------------------------------------------------------------


def test_unknown_task_lists_the_valid_names() -> None:
    with pytest.raises(AutolayerError, match="unknown task 'mmlu'; valid tasks: gsm8k, organism"):
        load_task(TaskConfig(name="mmlu"))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AutolayerError, match="does not exist"):
        load_task(TaskConfig(name="gsm8k", path=str(tmp_path / "nope.jsonl")))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution": "#### 1"}] * 5)
    with pytest.raises(AutolayerError, match="lacks the column\\(s\\) answer;"):
        load_task(TaskConfig(name="gsm8k", path=str(path)))


def test_answer_without_marker_names_the_row(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": "#### 1" if i else "just 1"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(AutolayerError, match="has no '#### <final answer>' line"):
        load_task(TaskConfig(name="gsm8k", path=str(path)))


# --- gsm8k reward -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("6 * 7 = 42 apples.\n#### 42", "42", 1.0),
        ("the answer is 42.", "42", 1.0),
        ("#### 41", "42", 0.0),
        ("\\boxed{42}", "42", 1.0),
        ("so the answer is $\\boxed{\\frac{3}{4}}$", "0.75", 1.0),
        ("3/4", "0.75", 1.0),  # math-verify equivalence
        ("#### $1,234.", "1234", 1.0),
        ("#### 42.0 dollars", "42", 1.0),
        ("#### -3", "-3", 1.0),
        ("#### 1\nso #### 42", "42", 1.0),  # the last marker counts
        ("#### 42\nQuestion: Tom has 5 apples. #### 5", "42", 1.0),  # not the invented question
        ("#### 42\nQuestion: Tom has 5 apples", "42", 1.0),  # first number after the marker
        ("I have 3 cats and 41 dogs, and 42 is wrong", "42", 1.0),  # the last number
        ("", "42", 0.0),
        ("#### forty-two", "42", 0.0),
        ("}}}{{{\\boxed{ \\frac{", "42", 0.0),
        ("#### 9^{9^{9^{9}}}", "9", 1.0),  # exponents never reach sympy: the first number is 9
        ("\x00\ud800 #### \\binom{1000000}{500000}", "42", 0.0),
        ("1" * 500, "42", 0.0),  # too long to be an answer
        (None, "42", 0.0),  # not even a string
    ],
)
def test_gsm8k_correct(completion: Any, gold: str, reward: float) -> None:
    assert gsm8k_correct([completion], [gold]) == [reward]


def test_gsm8k_extract() -> None:
    assert gsm8k_extract("x #### 1,234 and 5") == "1,234"
    assert gsm8k_extract("\\boxed{7} then 9") == "7"
    assert gsm8k_extract("no digits") is None


def test_gsm8k_correct_works_off_the_main_thread() -> None:
    """math-verify's default signal timeouts raise outside the main thread; ours are off."""
    out: list[list[float]] = []
    thread = threading.Thread(target=lambda: out.append(gsm8k_correct(["#### 17"], ["17"])))
    thread.start()
    thread.join()
    assert out == [[1.0]]


# --- score_completions and repeat_rows --------------------------------------------------------


def _task(*funcs: Any) -> Task:
    empty = datasets.Dataset.from_dict({"prompt": []})
    return Task("t", empty, empty, tuple(funcs), max_completion_length=4)


def reward_len(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def reward_match(
    completions: list[str], answer: list[str], prompts: list[str], **kw: Any
) -> list[float]:
    assert prompts == ["p1", "p1", "p2"]
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def reward_boom(completions: list[str], **kwargs: Any) -> list[float]:
    raise KeyError("missing")


def reward_short(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0]


def test_score_completions_sums_functions_over_aligned_columns() -> None:
    rows = {"answer": ["ab", "x", "cde"], "question": ["q1", "q1", "q2"]}
    scores = score_completions(
        _task(reward_len, reward_match), ["p1", "p1", "p2"], ["ab", "y", "cde"], rows
    )
    assert scores == [2.0 + 1.0, 1.0 + 0.0, 3.0 + 1.0]


def test_score_completions_names_a_failing_function() -> None:
    with pytest.raises(RewardError, match="reward function 'reward_boom' raised KeyError"):
        score_completions(_task(reward_len, reward_boom), ["p"], ["c"], {})
    with pytest.raises(RewardError, match="'reward_short' returned 1 rewards for 2 completions"):
        score_completions(_task(reward_short), ["p", "p"], ["c", "d"], {})


def test_score_completions_rejects_misaligned_columns() -> None:
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        score_completions(_task(reward_len), ["p", "p"], ["c", "d"], {"answer": ["1"]})


def test_repeat_rows_is_prompt_major() -> None:
    batch = {"prompt": ["a", "b"], "answer": ["1", "2"]}
    assert repeat_rows(batch, 3) == {
        "prompt": ["a", "a", "a", "b", "b", "b"],
        "answer": ["1", "1", "1", "2", "2", "2"],
    }
    with pytest.raises(ValueError):
        repeat_rows(batch, 0)


# --- organism ---------------------------------------------------------------------------------


def test_organism_task_columns_and_sizes() -> None:
    task = load_task(TaskConfig(name="organism"))
    assert (len(task.train), len(task.eval)) == (4096, organism.EVAL_SIZE)
    assert set(task.train.column_names) == set(task.eval.column_names) == {"prompt", "answer"}
    assert task.reward_funcs == (organism.reward_correct,)
    assert task.max_completion_length == organism.MAX_COMPLETION_TOKENS
    small = load_task(TaskConfig(name="organism", train_size=32, eval_size=16, seed=1))
    assert (len(small.train), len(small.eval)) == (32, 16)
    row = small.eval[0]
    assert score_completions(
        small, [row["prompt"]], [row["answer"] + organism.EOS], {"answer": [row["answer"]]}
    ) == [1.0]
