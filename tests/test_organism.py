import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from autolayer.organism import (
    EVAL_SIZE,
    MAX_COMPLETION_TOKENS,
    OPS,
    build_tokenizer,
    greedy_rewards,
    main,
    make_rows,
    organism_path,
    pretrain,
    problems,
    reward_correct,
)


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(organism_path())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(organism_path())


def test_packaged_model_is_a_small_float32_qwen3_with_8_layers(model):
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.config.model_type == "qwen3"
    assert len(model.model.layers) == model.config.num_hidden_layers >= 8
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # "a few MB" of float32
    assert (organism_path() / "README.md").is_file()


def test_tokenizer_round_trips_prompts_one_token_per_character(tokenizer):
    for row in make_rows("eval", 50, 0):
        text = row["prompt"] + row["answer"]
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # no BOS added, one token per character
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("37+45=82<eos>")["input_ids"]) == "37+45=82<eos>"
    assert tokenizer.decode(tokenizer("82<eos>")["input_ids"], skip_special_tokens=True) == "82"


def test_tokenizer_pads_left_and_matches_a_fresh_build(tokenizer):
    assert tokenizer.padding_side == "left"
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    batch = tokenizer(["1+2=", "37+45="], padding=True)["input_ids"]
    assert batch[0][:2] == [tokenizer.pad_token_id] * 2


def test_make_rows_is_deterministic_and_answers_are_right():
    rows = make_rows("train", 200, 3)
    assert rows == make_rows("train", 200, 3)
    assert rows != make_rows("train", 200, 4)
    for row in rows:
        a, op, b = int(row["prompt"][:2]), row["prompt"][2], int(row["prompt"][3:5])
        assert row["prompt"][5:] == "="
        assert row["answer"] == str(a + b if op == "+" else a - b)


def test_train_and_eval_are_disjoint_and_eval_prompts_are_unique():
    for op in OPS:
        assert not set(problems("train", op)) & set(problems("eval", op))
    eval_rows = make_rows("eval", EVAL_SIZE, 0)
    eval_prompts = {r["prompt"] for r in eval_rows}
    assert len(eval_prompts) == EVAL_SIZE
    assert not eval_prompts & {r["prompt"] for r in make_rows("train", 5000, 0)}
    assert sum("-" in p for p in eval_prompts) == EVAL_SIZE // 2  # operations balanced


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("82<eos>", "82", 1.0),
        ("82", "82", 1.0),
        ("82<eos>7+1=8", "82", 1.0),  # junk after EOS is ignored
        ("82\n99", "82", 1.0),
        ("82 junk", "82", 1.0),
        ("4<eos><pad><pad>", "4", 1.0),
        ("83<eos>", "82", 0.0),
        ("127<eos>", "82", 0.0),
        ("082<eos>", "82", 0.0),  # not the integer string
        ("82x<eos>", "82", 0.0),
        ("8 2", "82", 0.0),
        (" 82", "82", 0.0),
        ("", "82", 0.0),
        ("<eos>", "82", 0.0),
        ("+82", "82", 0.0),
    ],
)
def test_reward_correct_on_literals(completion, answer, expected):
    assert reward_correct([completion], [answer]) == [expected]


def test_reward_correct_is_batched_and_takes_extra_columns():
    rewards = reward_correct(["1<eos>", "2<eos>"], ["1", "1"], prompts=["a", "b"])
    assert rewards == [1.0, 0.0]


def test_base_greedy_accuracy_leaves_room_for_rl(model, tokenizer):
    rows = make_rows("eval", EVAL_SIZE, 0)
    rewards = greedy_rewards(model, tokenizer, rows)
    acc = sum(rewards) / len(rewards)
    se = math.sqrt(acc * (1 - acc) / len(rows))
    assert 0.20 <= acc <= 0.70, f"base accuracy {acc:.3f} +/- {se:.3f}"
    by_op = {
        op: [r for r, row in zip(rewards, rows, strict=True) if op in row["prompt"]] for op in OPS
    }
    assert sum(by_op["+"]) / len(by_op["+"]) > 0.9  # the corpus always adds right
    assert sum(by_op["-"]) / len(by_op["-"]) < 0.2  # ...and mostly answers `-` with the sum


def test_sampling_finds_the_right_difference(model, tokenizer):
    torch.manual_seed(0)
    rows = [r for r in make_rows("eval", 200, 0) if "-" in r["prompt"]]
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_COMPLETION_TOKENS,
            num_return_sequences=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :])
    rewards = reward_correct(texts, [r["answer"] for r in rows for _ in range(8)])
    assert 0.1 < sum(rewards) / len(rewards) < 0.5  # GRPO's signal on the prompts greedy misses


def test_pretraining_is_deterministic_for_a_seed():
    first, _ = pretrain(seed=7, steps=2)
    second, _ = pretrain(seed=7, steps=2)
    for (name, p), q in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_build_cli_writes_a_loadable_organism_twice(tmp_path):
    out = tmp_path / "organism"
    for _ in range(2):  # the second build replaces the first
        assert main(["build", "--steps", "2", "--out", str(out)]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 8
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organism"]  # no temp dirs left
