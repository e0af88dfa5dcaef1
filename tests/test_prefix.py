"""Each distinct prompt once: sampling and the grouped passes equal the repeated computation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autolayer import prefix
from autolayer.models import freeze_except, load_model
from autolayer.rollout import generate_completions

# Prompts of three lengths, so left padding differs between rows; two repeat.
PROMPTS = ["39+73=", "5+6=", "39+73=", "12+345=", "5+6="]
# Worked examples before each question (few-shot): 15 common tokens, run once for all rows
# (the organism's 32 positions leave no room for more; the tests lower the rule's threshold).
SHOTS = "11+22=33\n4+2=6\n"
FEW_SHOT = [SHOTS + p for p in PROMPTS]


@pytest.fixture(scope="module")
def organism() -> tuple[Any, Any]:
    model, tokenizer = load_model("organism", device="cpu")
    return model.eval(), tokenizer


def test_align_puts_the_common_prefix_first_then_left_padding() -> None:
    ids, mask = prefix.align([[7, 8, 1, 2], [7, 8, 3], [7, 8, 1, 2, 5, 6]], pad_id=0)
    assert ids.tolist() == [[7, 8, 0, 0, 1, 2], [7, 8, 0, 0, 0, 3], [7, 8, 1, 2, 5, 6]]
    assert mask.tolist() == [[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    # positions count real tokens: the common prefix holds 0 and 1 in every row
    assert prefix.position_ids(mask)[:, :2].tolist() == [[0, 1]] * 3
    assert prefix.position_ids(mask)[:, -1].tolist() == [3, 2, 5]
    # every row keeps a token of its own; no common prefix is plain left padding
    assert prefix.align([[7, 8], [7, 8, 9]], 0)[0].tolist() == [[7, 0, 8], [7, 8, 9]]
    assert prefix.align([[1, 2], [3]], 0)[0].tolist() == [[1, 2], [0, 3]]


def test_common_length_counts_shared_real_columns_worth_a_forward() -> None:
    ids = torch.tensor([[5] * 40 + [1, 2]] * 3)
    mask = torch.ones_like(ids)
    assert prefix.common_length(ids, mask) == 41  # all but the last column
    ids[1, 30] = 9
    assert prefix.common_length(ids, mask) == 0  # 30 x 2 other rows < 64 saved: not worth it
    assert prefix.common_length(torch.cat([ids, ids]), torch.cat([mask, mask])) == 30
    mask[2, 0] = 0  # a padded first column is not shared
    assert prefix.common_length(ids, mask) == 0


def test_distinct_rows_index_every_row_and_compare_masks() -> None:
    ids = torch.tensor([[0, 5], [7, 8], [0, 5], [7, 8]])
    mask = torch.tensor([[0, 1], [1, 1], [1, 1], [1, 1]])  # row 2's 0 is a real token
    unique, unique_mask, index = prefix.distinct_rows(ids, mask)  # type: ignore[misc]
    assert unique.shape[0] == 3
    assert torch.equal(unique[index], ids) and torch.equal(unique_mask[index], mask)
    assert prefix.distinct_rows(ids[:2], mask[:2]) is None


def _sampled_logits(
    model: Any, tokenizer: Any, share: bool, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion ids sampled on seed 0 and the logits each token was sampled from."""
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1]))
    torch.manual_seed(0)
    try:
        _, _, completion, shared = generate_completions(
            model, tokenizer, prompts, 5, do_sample=True, temperature=3.0, share_prompts=share
        )
    finally:
        hook.remove()
    assert (shared is not None) == share
    if shared is not None:  # the common prefix ran once where the prompts had one
        assert (shared.common, shared.distinct) == ((15 if prompts == FEW_SHOT else 0), 3)
    steps = completion.shape[1]
    return completion, torch.stack(seen[-steps:], dim=1)  # the prefill's own logits go unused


@pytest.mark.parametrize("prompts", [PROMPTS, FEW_SHOT], ids=["repeats", "few-shot"])
def test_sampling_from_shared_prompts_equals_the_repeated_path(
    organism: tuple[Any, Any], prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same tokens; every sampled token's log-prob equal to float rounding."""
    monkeypatch.setattr(prefix, "MIN_SAVED_POSITIONS", 16)
    model, tokenizer = organism
    repeated, repeated_logits = _sampled_logits(model, tokenizer, False, prompts)
    shared, shared_logits = _sampled_logits(model, tokenizer, True, prompts)
    assert torch.equal(shared, repeated)
    assert len({tuple(r) for r in repeated.tolist()}) > 2  # temperature 3: rows really differ

    def sampled_logprobs(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(-1, repeated[..., None])[..., 0]

    # fp32 sums over another layout of the same keys: equal to 1e-4
    torch.testing.assert_close(
        sampled_logprobs(shared_logits), sampled_logprobs(repeated_logits), rtol=0, atol=1e-4
    )


def _grouped_batch(tokenizer: Any, group: int, shots: str = "") -> tuple[torch.Tensor, ...]:
    rows = tokenizer([shots + p for p in ("39+73=", "5+6=", "12+345=")])["input_ids"]
    prompt_ids, prompt_mask = prefix.align(rows, tokenizer.pad_token_id)
    rows = prompt_ids.shape[0] * group
    generator = torch.Generator().manual_seed(1)
    completions = torch.randint(4, 20, (rows, 4), generator=generator)
    mask = torch.ones(rows, 4)
    mask[1, 2:] = 0  # a completion that stopped early
    return prompt_ids, prompt_mask, completions, mask


@pytest.mark.parametrize(("layers", "shots"), [([0], ""), ([3, 6], ""), ([3, 6], SHOTS)])
def test_grouped_pass_gives_the_repeated_log_probs_and_gradients(
    organism: tuple[Any, Any], layers: list[int], shots: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts once per group (B rows) against the repeated sequences (B x G rows): equal
    log-probs, and gradients of every trained parameter equal to 1e-5 of their largest entry."""
    base, tokenizer = organism
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    names = freeze_except(model, layers)
    prompt_ids, prompt_mask, completions, mask = _grouped_batch(tokenizer, 4, shots)
    monkeypatch.setattr(prefix, "MIN_SAVED_POSITIONS", 16)
    common = prefix.common_length(prompt_ids, prompt_mask)
    assert common == (15 if shots else 0)
    weights = torch.randn(completions.shape, generator=torch.Generator().manual_seed(2))

    def logprobs_and_grads(grouped: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        if grouped:
            logp = prefix.grouped_logprobs(
                model, model, prompt_ids, prompt_mask, completions, mask, 0.7, common
            )
        else:
            ids = torch.cat([prompt_ids.repeat_interleave(4, 0), completions], 1)
            attn = torch.cat([prompt_mask.repeat_interleave(4, 0), mask.long()], 1)
            out = model(input_ids=ids, attention_mask=attn, position_ids=prefix.position_ids(attn))
            logits = out.logits[:, prompt_ids.shape[1] - 1 : -1]
            logp = torch.log_softmax(logits.float() / 0.7, -1)
            logp = logp.gather(-1, completions[..., None])[..., 0]
        (logp * weights * mask).sum().backward()
        params = dict(model.named_parameters())
        return logp.detach(), {n: params[n].grad.detach().clone() for n in names}

    repeated, repeated_grads = logprobs_and_grads(grouped=False)
    grouped, grouped_grads = logprobs_and_grads(grouped=True)
    on = mask.bool()
    torch.testing.assert_close(grouped[on], repeated[on], rtol=0, atol=1e-5)
    assert len(grouped_grads) == 11 * len(layers)
    for name, grad in repeated_grads.items():
        assert grad.abs().max() > 0, name
        # fp32 sums in another order: equal to 1e-5 of the gradient's scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(grouped_grads[name], grad, rtol=0, atol=1e-5 * scale, msg=name)


def test_grouped_pass_refuses_rows_that_are_not_whole_groups(organism: tuple[Any, Any]) -> None:
    model, tokenizer = organism
    prompt_ids, prompt_mask, completions, mask = _grouped_batch(tokenizer, group=2)
    with pytest.raises(ValueError, match="5 completions for 3 prompts"):
        prefix.grouped_logprobs(model, model, prompt_ids, prompt_mask, completions[:5], mask[:5])


def test_a_sliding_window_shorter_than_the_rows_keeps_plain_left_padding(
    organism: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sliding window counts cache slots: the common-prefix layout would move tokens out of
    it, so rows that could outgrow the window are prefilled whole and left-padded."""
    model, tokenizer = organism
    monkeypatch.setattr(model.config, "sliding_window", 8, raising=False)
    ids, mask, _, shared = generate_completions(model, tokenizer, PROMPTS, 5)
    assert shared is None
    assert mask.tolist()[1] == [0, 0, 0, 1, 1, 1, 1]  # "5+6=" left-padded to 7 columns
