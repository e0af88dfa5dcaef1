"""Each distinct prompt computed once: in sampling and in the policy-gradient passes.

GRPO samples G completions per prompt, and a causal model's prompt positions never see the
completions, so the G copies of a prompt hold the same keys, values and hidden states. Sampling
prefills each distinct prompt once and expands its KV cache to the G rows (what vLLM's prefix
caching gives TRL on GPUs); the loss runs the prompt once per group with gradients and lets each
completion attend to the expanded cache, Prefix Grouper's shared-prefix forward (arXiv
2506.05433): the same log-probs and, through the expansion's backward, the same gradients as the
repeated computation, to float rounding.

Written here rather than taken from a library: transformers' generation has no prefix sharing on
CPU, and TRL's loss repeats the prompt per completion.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from autolayer import rl

Forward = Callable[..., Any]  # the model's forward, or a functional_call of it


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _forward_parameters(model: nn.Module) -> frozenset[str]:
    return frozenset(inspect.signature(model.forward).parameters)


def cache_keyword(model: nn.Module) -> str | None:
    """The name the model's forward takes its KV cache by (`cache` since transformers 5.2x,
    `past_key_values` before), or None when it takes none: such a model is never shared."""
    names = _forward_parameters(model)
    return next((k for k in ("cache", "past_key_values") if k in names), None)


def keeps_logits(model: nn.Module) -> bool:
    """Whether the forward can compute logits at the last positions only (`logits_to_keep`)."""
    return "logits_to_keep" in _forward_parameters(model)


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache laid out for the model (sliding-window layers included)."""
    return DynamicCache(config=getattr(model, "config", None))


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def prefill(
    model: nn.Module, forward: Forward, ids: torch.Tensor, mask: torch.Tensor, cache: Any
) -> Any:
    """Run `ids` into `cache`, with logits only at the last position; returns the output."""
    keyword = cache_keyword(model)
    assert keyword is not None
    kwargs: dict[str, Any] = {keyword: cache}
    if keeps_logits(model):
        kwargs["logits_to_keep"] = 1
    return forward(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
        **kwargs,
    )  # fmt: skip


def grouped_logprobs(
    model: nn.Module,
    forward: Forward,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs (N, T) of N = B x G completions, prompt-major, of B distinct prompts (B, P).

    The prompts run once with a fresh cache (with gradients, when enabled); the cache is
    expanded to G rows per prompt and the completions run against it. The first completion
    token is predicted by the prompt's last position, the others by the completion positions
    before them, exactly the positions the repeated pass would keep.
    """
    group = completion_ids.shape[0] // prompt_ids.shape[0]
    if group * prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{completion_ids.shape[0]} completions for {prompt_ids.shape[0]} prompts")
    keyword = cache_keyword(model)
    assert keyword is not None
    first = prefill(model, forward, prompt_ids, prompt_mask, new_cache(model))
    cache = _returned_cache(first)
    cache.batch_repeat_interleave(group)  # differentiable: the G rows' gradients add up
    mask = torch.cat(
        [prompt_mask.repeat_interleave(group, dim=0), completion_mask.to(prompt_mask.dtype)], dim=1
    )
    rest = forward(
        input_ids=completion_ids,
        attention_mask=mask,
        position_ids=position_ids(mask)[:, prompt_ids.shape[1] :],
        use_cache=True,
        **{keyword: cache},
    )
    logits = torch.cat(
        [first.logits[:, -1:].repeat_interleave(group, dim=0), rest.logits[:, :-1]], dim=1
    )
    return rl.token_logprobs(logits, completion_ids, temperature)


def distinct_rows(
    ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(distinct ids, their mask, each row's index among them), or None when no row repeats.

    Rows are compared with their mask, so a real token equal to the pad id is not padding."""
    keys = torch.cat([ids, mask.to(ids.dtype)], dim=1)
    unique, index = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == ids.shape[0]:
        return None
    width = ids.shape[1]
    return unique[:, :width], unique[:, width:].to(mask.dtype), index


def mark_length(cache: Any, layer: int, hidden: torch.Tensor) -> None:
    """Record in `cache` that layer `layer` saw `hidden`'s positions, without its keys.

    A layer skipped by replaying its output (`proxy`'s frozen prefix) writes no keys, but
    transformers sizes the attention mask of the next forward from the cache length of the
    first layer; a zero-stride placeholder of one head and width 1 keeps that length right.
    Nothing reads these placeholders: the skipped layers are skipped in every later forward too.
    """
    rows, length = hidden.shape[:2]
    marker = hidden.new_zeros(()).expand(rows, 1, length, 1)
    cache.update(marker, marker, layer)
