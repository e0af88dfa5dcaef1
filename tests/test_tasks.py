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
from autolayer.gsm8k import FORMAT_SAMPLE as GSM8K_SAMPLE
from autolayer.gsm8k import PROMPT as GSM8K_PROMPT
from autolayer.gsm8k import extract as gsm8k_extract
from autolayer.gsm8k import final_answer as gsm8k_final_answer
from autolayer.gsm8k import gsm8k_correct
from autolayer.task_rewards import score_completions
from autolayer.tasks import Task, for_tokenizer, load_task, prompt_text


def gsm8k(**kwargs: Any) -> Task:
    return load_task(TaskConfig(name="gsm8k", data_files=str(GSM8K_SAMPLE), **kwargs))


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
    assert task.chat_template == "auto"


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
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    task = load_task(TaskConfig(name="gsm8k", data_files=path))
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


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        assert kwargs == {"tokenize": False, "add_generation_prompt": True}
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_gsm8k_prompt_uses_a_chat_template_when_present() -> None:
    task = gsm8k(eval_size=2)
    plain = GSM8K_PROMPT.format(question=task.eval[0]["question"])
    assert prompt_text(task.eval[0]["prompt"], None) == plain
    chat = for_tokenizer(task, ChatTokenizer())
    assert chat.eval[0]["prompt"] == [{"role": "user", "content": plain}]
    assert prompt_text(chat.eval[0]["prompt"], ChatTokenizer()) == f"<user>{plain}<assistant>"
    assert for_tokenizer(task, object()).eval[0]["prompt"] == plain  # no template: unchanged


def test_gsm8k_parquet_and_test_split_directory(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(6)]
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    )
    data["train"].to_parquet(str(tmp_path / "train.parquet"))
    task = load_task(TaskConfig(name="gsm8k", dataset=str(tmp_path / "train.parquet")))
    assert len(task.train) + len(task.eval) == 4
    data.save_to_disk(str(tmp_path / "saved"))
    task = load_task(TaskConfig(name="gsm8k", dataset=str(tmp_path / "saved")))
    assert list(task.eval["question"]) == ["q4", "q5"]  # the test split, in order
    assert list(task.train["question"]) == ["q0", "q1", "q2", "q3"]


# --- load_task errors -------------------------------------------------------------------------


def test_unknown_task_lists_the_valid_names() -> None:
    with pytest.raises(
        AutolayerError,
        match="unknown task 'mmlu'; built-in tasks: antonym, category_pick, chat_arithmetic, "
        "code_organism, gridworld, gsm8k, humaneval, larger_of_two, next_number, organism; for "
        "your own task set task.dataset or task.data_files, and task.reward_funcs",
    ):
        load_task(TaskConfig(name="mmlu"))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AutolayerError, match="does not exist"):
        load_task(TaskConfig(name="gsm8k", data_files=str(tmp_path / "nope.jsonl")))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution": "#### 1"}] * 5)
    with pytest.raises(AutolayerError, match="lacks the column\\(s\\) answer;"):
        load_task(TaskConfig(name="gsm8k", data_files=str(path)))


def test_answer_without_marker_names_the_row(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": "#### 1" if i else "just 1"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(AutolayerError, match="has no '#### <final answer>' line"):
        load_task(TaskConfig(name="gsm8k", data_files=str(path)))


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


# --- the task API: your data, your rewards -----------------------------------------------------


REWARDS_PY = """
def exact(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def maybe(completions, **kwargs):
    return [None if c == "skip" else 0.5 for c in completions]


def no_kwargs(completions):
    return [0.0 for _ in completions]


def wrong_length(completions, **kwargs):
    return [0.0]


def text_rewards(completions, **kwargs):
    return ["good" for _ in completions]


def boom(completions, **kwargs):
    raise KeyError("no such column")
"""


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    rows = "a,b,answer\n" + "".join(f"{i},{i + 1},{2 * i + 1}\n" for i in range(10))
    (tmp_path / "data.csv").write_text(rows)
    return tmp_path


def user_task(root: Path, **kwargs: Any) -> TaskConfig:
    fields: dict[str, Any] = {
        "name": "adder",
        "data_files": str(root / "data.csv"),
        "prompt_template": "{a}+{b}=",
        "reward_funcs": [f"{root / 'rewards.py'}:exact", f"{root / 'rewards.py'}:maybe"],
        "reward_weights": [1.0, 2.0],
    }
    if "reward_funcs" in kwargs:
        fields["reward_weights"] = None
    return TaskConfig(**{**fields, **kwargs})


def test_a_csv_task_with_a_template_and_weighted_file_rewards(user_files: Path) -> None:
    task = load_task(user_task(user_files, eval_fraction=0.3))
    assert (len(task.train), len(task.eval)) == (7, 3)
    assert task.eval.column_names == ["a", "b", "answer", "prompt"]  # every column reaches rewards
    row = task.eval[0]
    assert row["prompt"] == f"{row['a']}+{row['b']}="
    assert task.max_completion_length == 256 and task.stop_strings == ()
    # weights 1 and 2; `maybe` returns None for "skip", which adds 0 as in TRL's nansum
    got = score_completions(task, ["p"] * 3, ["3", "4", "skip"], {"answer": [3, "4", "9"]})
    assert got == [0.0 + 1.0, 1.0 + 1.0, 0.0 + 0.0]


def test_dotted_reward_paths_and_prompt_column(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"q": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    )
    task = load_task(
        TaskConfig(
            name="mine",
            data_files={"train": str(path), "test": str(path)},
            prompt_column="q",
            reward_funcs=["autolayer.organism.reward_correct"],
        )
    )
    assert task.reward_funcs == (organism.reward_correct,)
    assert list(task.eval["prompt"]) == [f"{i}+1=" for i in range(5)]  # the test split, in order


def test_chat_message_prompts_get_completions_as_messages(tmp_path: Path) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": f"say {i}"}], "answer": str(i)} for i in range(4)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)  # type: ignore[arg-type]
    seen: list[Any] = []

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        seen.extend(completions)
        return [1.0] * len(completions)

    task = load_task(TaskConfig(name="chat", data_files=str(path), reward_funcs=["os.path.join"]))
    task = Task("chat", task.train, task.eval, (reward,))
    prompts = [task.eval[0]["prompt"]]
    assert score_completions(task, prompts, ["hi"], {"answer": ["0"]}) == [1.0]
    assert seen == [[{"role": "assistant", "content": "hi"}]]
    assert prompt_text(prompts[0], ChatTokenizer()).startswith("<user>say")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt_template": "{a}+{c}="}, "prompt_template refers to the column 'c'"),
        ({"prompt_template": None}, "has no 'prompt' column .* set task.prompt_column"),
        ({"reward_funcs": ["no.such.module.func"]}, "cannot import no.such.module"),
        ({"reward_funcs": ["missing.py:func"]}, "the file missing.py does not exist"),
        ({"reward_funcs": ["autolayer.organism.nothing"]}, "has no callable 'nothing'"),
        ({"reward_funcs": ["justaname"]}, "must be a dotted path"),
        ({"data_files": "nope.csv"}, "task data file nope.csv does not exist"),
        ({"data_files": None, "dataset": "./nope"}, "task data ./nope does not exist"),
        ({"data_files": "data.txt"}, "does not exist"),
        ({"reward_funcs": None}, "has no reward functions"),
        ({"eval_split": "validation"}, "has no 'validation' split; its splits are train"),
        ({"eval_size": 50}, "eval_size is 50 but the held-out split has only 2 rows"),
    ],
)
def test_bad_task_input_is_one_sentence(
    user_files: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], message: str
) -> None:
    monkeypatch.chdir(user_files)
    with pytest.raises(AutolayerError, match=message):
        load_task(user_task(user_files, **overrides))


def test_an_empty_split_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("prompt,answer\nx,1\n")
    (tmp_path / "test.csv").write_text("prompt,answer\n")
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    with pytest.raises(AutolayerError, match="is empty|cannot read"):
        load_task(TaskConfig(name="t", data_files=files, reward_funcs=["os.path.join"]))


def test_text_that_is_not_utf8_is_refused_when_read(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}).encode() for i in range(6)]
    rows[4] = b'{"prompt": "caf\xe9 4+1=", "answer": "5"}'  # Latin-1, as a spreadsheet saves it
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    config = TaskConfig(
        name="mine", data_files=str(tmp_path / "d.jsonl"), reward_funcs=["os.path.join"]
    )
    with pytest.raises(
        AutolayerError, match="'prompt' column of its train split is not valid UTF-8"
    ):
        load_task(config)


@pytest.mark.parametrize(
    "empty",
    ["", "  \n", [{"role": "user", "content": ""}], []],
    ids=["text", "blank", "chat", "none"],
)
def test_an_empty_prompt_is_refused(tmp_path: Path, empty: Any) -> None:
    chat = not isinstance(empty, str)
    rows = [
        {"prompt": [{"role": "user", "content": f"{i}+1="}] if chat else f"{i}+1=", "answer": "1"}
        for i in range(8)
    ]
    rows[5]["prompt"] = empty
    train = write_jsonl(tmp_path / "train.jsonl", rows)  # type: ignore[arg-type]
    test = write_jsonl(tmp_path / "test.jsonl", rows[:4])  # type: ignore[arg-type]
    files = {"train": str(train), "test": str(test)}
    config = TaskConfig(name="mine", data_files=files, reward_funcs=["os.path.join"])
    with pytest.raises(AutolayerError, match="1 of the 8 prompts of the train data are empty"):
        load_task(config)


@pytest.mark.parametrize(
    ("func", "message"),
    [
        ("no_kwargs", "does not take TRL's reward signature"),
        ("wrong_length", "'wrong_length' returned 1 rewards for 4 completions"),
        ("text_rewards", "'text_rewards' returned 'good' \\(str\\); rewards must be numbers"),
        ("boom", "'boom' raised KeyError"),
    ],
)
def test_check_rewards_names_a_broken_function(user_files: Path, func: str, message: str) -> None:
    from autolayer.task_rewards import check_rewards

    task = load_task(user_task(user_files, reward_funcs=[f"{user_files}/rewards.py:{func}"]))
    with pytest.raises(AutolayerError, match=message):
        check_rewards(task)


def test_the_fingerprint_follows_the_reward_source_and_the_stops(user_files: Path) -> None:
    from autolayer.tasks import task_fingerprint

    first = task_fingerprint(load_task(user_task(user_files)))
    assert task_fingerprint(load_task(user_task(user_files))) == first
    assert task_fingerprint(load_task(user_task(user_files, stop_strings=["\n"]))) != first
    assert task_fingerprint(load_task(user_task(user_files, reward_weights=[1.0, 1.0]))) != first
    other = user_files / "other"
    other.mkdir()
    (other / "rewards.py").write_text(REWARDS_PY.replace("1.0 if c == a", "1.0 if c != a"))
    funcs = [f"{other}/rewards.py:exact", f"{other}/rewards.py:maybe"]
    edited = user_task(user_files, reward_funcs=funcs, reward_weights=[1.0, 2.0])
    assert task_fingerprint(load_task(edited)) != first


def test_config_paths_are_read_relative_to_the_config_file(
    user_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autolayer.config import load_config

    (user_files / "task.yaml").write_text(
        "task:\n  name: adder\n  data_files: data.csv\n  prompt_template: '{a}+{b}='\n"
        "  reward_funcs: [rewards.py:exact, autolayer.organism.reward_correct]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(user_files / "task.yaml")
    assert config.task.data_files == str(user_files / "data.csv")
    assert config.task.reward_funcs == [
        f"{user_files / 'rewards.py'}:exact",
        "autolayer.organism.reward_correct",
    ]
    assert len(load_task(config.task).eval) == 2


def test_humaneval_ships_offline_with_the_package() -> None:
    task = load_task(TaskConfig(name="humaneval"))
    assert len(task.train) + len(task.eval) == 164
    assert {"prompt", "test", "entry_point"} <= set(task.eval.column_names)
    assert task.stop_strings[:2] == ("\nclass", "\ndef")


@pytest.mark.parametrize("name", ["organism", "code_organism"])
def test_a_generated_eval_set_is_never_padded_with_repeats(name: str) -> None:
    """eval_size 100,000 once gave 100,000 rows drawn from 2,447 distinct problems."""
    with pytest.raises(AutolayerError, match="held-out problems can give without repeats"):
        load_task(TaskConfig(name=name, eval_size=100_000))


def test_chat_arithmetic_splits_share_no_question_and_wrap_in_the_chat_template() -> None:
    from autolayer.builtin_tasks import chat_arithmetic_rows

    train = chat_arithmetic_rows("train", 500, 0)
    held_out = chat_arithmetic_rows("eval", 200, 0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(int(r["answer"]) == sum(map(int, r["prompt"][8:-1].split(" + "))) for r in train)
    assert chat_arithmetic_rows("eval", 200, 0) == held_out  # deterministic for a seed
