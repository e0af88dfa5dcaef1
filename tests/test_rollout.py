"""Generation: where completions stop, and what a completion is."""

from __future__ import annotations

import torch

from autolayer.config import TaskConfig
from autolayer.models import load_model
from autolayer.rollout import (
    completion_mask,
    decode,
    eos_token_ids,
    generate_completions,
    masked_ids,
)
from autolayer.tasks import load_task


def test_generation_stops_at_any_eos_id_and_at_stop_strings() -> None:
    """A chat model lists several EOS ids: decoding stops at either, as TRL's does."""
    model, tokenizer = load_model("organism", device="cpu")
    task = load_task(TaskConfig(eval_size=50), tokenizer)
    prompts = [p for p in task.eval["prompt"]]
    _, _, plain, _ = generate_completions(model, tokenizer, prompts, 4)
    digit = tokenizer.convert_tokens_to_ids("1")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, digit]
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, digit]
    _, _, stopped, _ = generate_completions(model, tokenizer, prompts, 4)
    mask = completion_mask(model, tokenizer, stopped)
    for row, keep in zip(stopped.tolist(), mask.tolist(), strict=True):
        if digit in row:  # nothing after the first "1" is produced or kept
            cut = row.index(digit)
            assert keep[: cut + 1] == [1.0] * (cut + 1) and not any(keep[cut + 1 :])
    assert (stopped == digit).any() and not torch.equal(stopped, plain)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _, _, by_string, _ = generate_completions(model, tokenizer, prompts, 4, stop_strings=["1"])
    texts = decode(tokenizer, masked_ids(by_string, completion_mask(model, tokenizer, by_string)))
    assert all(t.count("1") <= 1 and (not t or "1" not in t or t.endswith("1")) for t in texts)
    assert any(t.endswith("1") for t in texts)
