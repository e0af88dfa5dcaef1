"""Rollout: sampling and greedy decoding of completions, the one generation path shared by the
held-out scorer, the proxy's rollouts, agent turns and (through `stop_criteria`) TRL.

Generation stops at every EOS id and after any stop string, as TRL's does; a completion is the
tokens it really produced, masked and decoded the way TRL hands them to reward functions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from autolayer import prefix, rl
from autolayer.frozen import Frozen, prefill_below
from autolayer.tasks import Task, prompt_text


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's list plus the tokenizer's EOS.

    Chat models often list two (e.g. `<|im_end|>` and `<|endoftext|>`); TRL stops at any of them.
    """
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


class Generated(NamedTuple):
    prompt_ids: torch.Tensor  # (N, P) the prompts as the model saw them
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, T) padding included
    shared: prefix.Shared | None  # how the prompts were prefilled, when they were shared


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    stop_strings: Sequence[str] = (),
    share_prompts: bool = True,
    frozen: Frozen | None = None,
) -> Generated:
    """Generate from the prompts; stops at any EOS id and after any stop string, as TRL's
    generation does, and pads rows that stopped early with the pad id.

    With `share_prompts`, the prompts are laid out with their common prefix first
    (`prefix.align`) and every distinct token position is prefilled once: the common prefix,
    then each distinct prompt (G samples of one prompt, agent turns with one history), all but
    its last token, whose cache is copied to every row that asks for it. Without it, every row
    is left-padded and prefilled on its own. With `frozen`, a shared prefill takes the layers
    below the run's lowest trained one from the study's store (`frozen.prefill_below`).
    """
    device = next(model.parameters()).device
    rows = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window and max(len(r) for r in rows) + max_new_tokens > window:
        # a sliding window counts cache slots, and the common-prefix layout's padding sits
        # between the prefix and a prompt's own tokens: keep plain left padding
        share_prompts = False
    if share_prompts:
        ids, mask = (t.to(device) for t in prefix.align(rows, tokenizer.pad_token_id))
    else:
        enc = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    keyword = prefix.cache_keyword(model)
    shared = prefill_below(model, ids, mask, frozen) if share_prompts and keyword else None
    cache = {keyword: shared.cache} if shared is not None and keyword else {}
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
        stopping_criteria=stop_criteria(tokenizer, tuple(stop_strings)),
        **cache,
        **(sampling if do_sample else {"do_sample": False}),
    )
    return Generated(ids, mask, out[:, ids.shape[1] :], shared)


class TailStop(StoppingCriteria):
    """Stops a row once its decoded tail ends with a stop string.

    transformers' StopStringCriteria (used when it can be built) indexes the vocabulary by
    tokenizing the letters `abcdef`, which a character tokenizer without letters cannot; this
    decodes the last few tokens instead, with the same "ends with" rule.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = max(len(s) for s in stops)  # every token decodes to at least one character

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window :])
        done = [any(t.endswith(s) for s in self.stops) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@functools.lru_cache(maxsize=16)
def stop_criteria(tokenizer: Any, stops: tuple[str, ...]) -> StoppingCriteriaList:
    """Criteria that end a row after any of `stops`, as `generate(stop_strings=...)` would.

    Built once per tokenizer and stops: transformers' criteria precomputes a table over the
    whole vocabulary, which takes seconds for a 150k-token vocabulary.
    """
    if not stops:
        return StoppingCriteriaList()
    try:
        return StoppingCriteriaList([StopStringCriteria(tokenizer, list(stops))])
    except ValueError:
        return StoppingCriteriaList([TailStop(tokenizer, stops)])


def completion_mask(model: nn.Module, tokenizer: Any, completion_ids: torch.Tensor) -> torch.Tensor:
    """The tokens each completion really produced: through its first EOS, never the padding
    that follows a stop string."""
    return rl.completion_mask(
        completion_ids, eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    )


def masked_ids(completion_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each completion's produced token ids, as TRL passes `completion_ids` to rewards."""
    return [ids[m.bool()].tolist() for ids, m in zip(completion_ids, mask, strict=True)]


def decode(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    """Completion texts, special tokens dropped (TRL's decoding)."""
    return [str(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@dataclass(frozen=True)
class Completions:
    """A batch of completions as the loss and the rewards need them."""

    prompt_ids: torch.Tensor  # (N, P) left-padded prompts
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, T) as generated, padding included
    mask: torch.Tensor  # (N, T) float: the tokens each completion really produced
    ids: list[list[int]]  # each completion's produced ids (TRL's completion_ids)
    texts: list[str]  # their decoded text
    shared: prefix.Shared | None = None  # how the prompts were prefilled, when shared


def complete(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    prompts: list[Any],
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    share_prompts: bool = True,
    frozen: Frozen | None = None,
) -> Completions:
    """Render `prompts` (text or chat messages), generate with the task's length and stop
    strings, and mask, cut and decode what each completion produced: the one generation path
    of scoring, proxy rollouts and agent turns."""
    prompt_ids, prompt_mask, completion_ids, shared = generate_completions(
        model,
        tokenizer,
        [prompt_text(p, tokenizer) for p in prompts],
        task.max_completion_length,
        do_sample=do_sample,
        temperature=temperature,
        stop_strings=task.stop_strings,
        share_prompts=share_prompts,
        frozen=frozen,
    )
    mask = completion_mask(model, tokenizer, completion_ids)
    ids = masked_ids(completion_ids, mask)
    texts = decode(tokenizer, ids)
    return Completions(prompt_ids, prompt_mask, completion_ids, mask, ids, texts, shared)
