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
from dataclasses import dataclass
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


# A shared prefix must save this many token positions to be worth its own forward: below it the
# extra call costs more than the positions it saves on a small model.
MIN_SAVED_POSITIONS = 64


def extend(
    model: nn.Module,
    forward: Forward,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    last_only: bool = True,
) -> Any:
    """Run the new columns `ids` into `cache`, whose rows already hold `mask`'s earlier columns
    (`mask` covers cached and new columns); logits at the last position only, or at all."""
    keyword = cache_keyword(model)
    assert keyword is not None
    kwargs: dict[str, Any] = {keyword: cache}
    if last_only and keeps_logits(model):
        kwargs["logits_to_keep"] = 1
    return forward(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, -ids.shape[1] :],
        use_cache=True, **kwargs,
    )  # fmt: skip


def common_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The leading columns that every row holds as the same real tokens, at most all but the
    last (whose logits each row needs), where sharing them saves `MIN_SAVED_POSITIONS`."""
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)
    common = min(int(same.long().cumprod(dim=0).sum()), ids.shape[1] - 1)
    return common if common * (ids.shape[0] - 1) >= MIN_SAVED_POSITIONS else 0


def align(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one batch, their longest common prefix first in every row, then left
    padding, then each row's own tokens: (ids, attention_mask).

    With no common prefix this is plain left padding. The common prefix holds the same
    positions in every row (positions count real tokens: `position_ids`), so a shared cache of
    it can stand for every row's, whatever each row's length.
    """
    common = 0
    shortest = min(len(r) for r in rows)
    while common < shortest - 1 and all(r[common] == rows[0][common] for r in rows):
        common += 1
    width = max(len(r) for r in rows) - common
    ids = torch.full((len(rows), common + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        start = ids.shape[1] - len(row) + common
        ids[i, :common] = torch.tensor(row[:common])
        ids[i, start:] = torch.tensor(row[common:])
        mask[i, :common] = 1
        mask[i, start:] = 1
    return ids, mask


def grouped_logprobs(
    model: nn.Module,
    forward: Forward,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    common: int = 0,
) -> torch.Tensor:
    """Log-probs (N, T) of N = B x G completions, prompt-major, of B distinct prompts (B, P).

    The prompts' first `common` columns (the same in every row) run once, the rest of each
    prompt once, with a fresh cache expanded at each level (with gradients, when enabled):
    the completions run against the expanded cache. The first completion token is predicted by
    the prompt's last position, the others by the completion positions before them, exactly
    the positions the repeated pass would keep.
    """
    rows = prompt_ids.shape[0]
    group = completion_ids.shape[0] // rows
    if group * rows != completion_ids.shape[0]:
        raise ValueError(f"{completion_ids.shape[0]} completions for {rows} prompts")
    cache = new_cache(model)
    if common:
        extend(model, forward, prompt_ids[:1, :common], prompt_mask[:1, :common], cache)
        cache.batch_repeat_interleave(rows)
    first = extend(model, forward, prompt_ids[:, common:], prompt_mask, cache)
    cache.batch_repeat_interleave(group)  # differentiable: the rows' gradients add up
    mask = torch.cat(
        [prompt_mask.repeat_interleave(group, dim=0), completion_mask.to(prompt_mask.dtype)], dim=1
    )
    rest = extend(model, forward, completion_ids, mask, cache, last_only=False)
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


@dataclass
class Shared:
    """A prompt batch prefilled with each distinct position once: what the layout was."""

    cache: Any  # every row's prompt but its last token
    common: int  # leading columns run once for all rows (0: none)
    index: torch.Tensor | None  # each row's distinct prompt (None: every row is distinct)
    distinct: int  # the rows the prompts' own columns ran for


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Shared | None:
    """Every row's prompt but its last token in one cache, the common prefix run once and
    each distinct prompt's own columns once; None when nothing is shared (then generation
    prefills as usual). `generate` then feeds only the last prompt token, whose logits it
    samples from."""
    if ids.shape[1] < 2:
        return None
    distinct = distinct_rows(ids, mask)
    unique, unique_mask, index = distinct if distinct is not None else (ids, mask, None)
    common = common_length(unique, unique_mask)
    if common == 0 and index is None:
        return None
    cache = new_cache(model)
    if common:
        extend(model, model, unique[:1, :common], unique_mask[:1, :common], cache)
        cache.batch_repeat_interleave(unique.shape[0])
    if ids.shape[1] - 1 > common:
        extend(model, model, unique[:, common:-1], unique_mask[:, :-1], cache)
    if index is not None:
        cache.batch_select_indices(index)
    return Shared(cache, common, index, unique.shape[0])
