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


@pytest.fixture(scope="module")
def organism() -> tuple[Any, Any]:
    model, tokenizer = load_model("organism", device="cpu")
    return model.eval(), tokenizer


def test_distinct_rows_index_every_row_and_compare_masks() -> None:
    ids = torch.tensor([[0, 5], [7, 8], [0, 5], [7, 8]])
    mask = torch.tensor([[0, 1], [1, 1], [1, 1], [1, 1]])  # row 2's 0 is a real token
    unique, unique_mask, index = prefix.distinct_rows(ids, mask)  # type: ignore[misc]
    assert unique.shape[0] == 3
    assert torch.equal(unique[index], ids) and torch.equal(unique_mask[index], mask)
    assert prefix.distinct_rows(ids[:2], mask[:2]) is None


def _sampled_logits(model: Any, tokenizer: Any, share: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion ids sampled on seed 0 and the logits each token was sampled from."""
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1]))
    torch.manual_seed(0)
    try:
        _, _, completion, index = generate_completions(
            model, tokenizer, PROMPTS, 5, do_sample=True, temperature=3.0, share_prompts=share
        )
    finally:
        hook.remove()
    assert (index is not None) == share
    steps = completion.shape[1]
    return completion, torch.stack(seen[-steps:], dim=1)  # the prefill's own logits go unused


def test_sampling_from_shared_prompts_equals_the_repeated_path(organism: tuple[Any, Any]) -> None:
    """Same seed, same tokens; every sampled token's log-prob equal to float rounding."""
    model, tokenizer = organism
    repeated, repeated_logits = _sampled_logits(model, tokenizer, share=False)
    shared, shared_logits = _sampled_logits(model, tokenizer, share=True)
    assert torch.equal(shared, repeated)
    assert len({tuple(r) for r in repeated.tolist()}) > 2  # temperature 3: rows really differ

    def sampled_logprobs(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(-1, repeated[..., None])[..., 0]

    torch.testing.assert_close(
        sampled_logprobs(shared_logits), sampled_logprobs(repeated_logits), rtol=0, atol=1e-5
    )


def _grouped_batch(tokenizer: Any, group: int) -> tuple[torch.Tensor, ...]:
    enc = tokenizer(["39+73=", "5+6=", "12+345="], return_tensors="pt", padding=True)
    rows = enc["input_ids"].shape[0] * group
    generator = torch.Generator().manual_seed(1)
    completions = torch.randint(4, 20, (rows, 4), generator=generator)
    mask = torch.ones(rows, 4)
    mask[1, 2:] = 0  # a completion that stopped early
    return enc["input_ids"], enc["attention_mask"], completions, mask


@pytest.mark.parametrize("layers", [[0], [3, 6]])
def test_grouped_pass_gives_the_repeated_log_probs_and_gradients(
    organism: tuple[Any, Any], layers: list[int]
) -> None:
    """Prompts once per group (B rows) against the repeated sequences (B x G rows): equal
    log-probs, and gradients of every trained parameter equal to 1e-5 of their largest entry."""
    base, tokenizer = organism
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    names = freeze_except(model, layers)
    prompt_ids, prompt_mask, completions, mask = _grouped_batch(tokenizer, group=4)
    weights = torch.randn(completions.shape, generator=torch.Generator().manual_seed(2))

    def logprobs_and_grads(grouped: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        if grouped:
            logp = prefix.grouped_logprobs(
                model, model, prompt_ids, prompt_mask, completions, mask, temperature=0.7
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
