"""The frozen layers below the trained ones, replayed instead of run: within a run, and across
the runs of a study.

Layers below a run's lowest trained layer keep the base weights, so over the same tokens they
give the same keys, values and output in every pass of the run and in every run that trains
that layer or a higher one. Within a run, `proxy` keeps their output from generation and
replays it in the policy-gradient passes. Across runs, `FrozenStates` keeps a prompt batch's
prefill (each layer's input and the frozen layers' KV cache) the first time a run prefills it,
and every later run whose lowest trained layer it covers starts from there: the held-out
scoring of a search's trials and their rollouts (every trial trains on the study's prompts)
prefill those layers once per study, not once per evaluation and step.

Written here rather than taken from a library: transformers' generation starts every prefill
from the embeddings, and vLLM's prefix caching (what TRL uses on GPUs) keeps whole-model prefixes
of one set of weights, not the part of the stack that several weight sets share.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autolayer import prefix


def mark_length(cache: Any, layer: int, hidden: torch.Tensor) -> None:
    """Record in `cache` that layer `layer` saw `hidden`'s positions, without its keys.

    A layer skipped by replaying its output writes no keys, but transformers sizes the
    attention mask of the next forward from the cache length of the first layer; a zero-stride
    placeholder of one head and width 1 keeps that length right. Nothing reads these
    placeholders: the skipped layers are skipped in every later forward too, or (`prefill_below`)
    their real keys replace the placeholders before anything attends to them.
    """
    rows, length = hidden.shape[:2]
    marker = hidden.new_zeros(()).expand(rows, 1, length, 1)
    cache.update(marker, marker, layer)


class Passthrough(nn.Module):
    """Stands in for a frozen layer while its output is replayed: hands its input on, in the
    return form of the layer it replaces, and marks the positions it skipped in a KV cache it
    is given (`mark_length`)."""

    def __init__(self, as_tuple: bool, index: int) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_input(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            mark_length(cache, self.index, hidden)
        return (hidden,) if self.as_tuple else hidden


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> Any:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def replaying(
    layers: nn.ModuleList, lowest: int, as_tuple: bool, inputs: Iterator[torch.Tensor]
) -> Iterator[None]:
    """While it lasts, `layers[:lowest]` are pass-throughs and each forward hands
    `layers[lowest]` the next of `inputs` instead of what came up from below. The hook runs
    before any other on that layer, so hooks that watch its input see the replayed one."""
    below = [layers[i] for i in range(lowest)]
    for i in range(lowest):
        layers[i] = Passthrough(as_tuple, i)
    handle = layers[lowest].register_forward_pre_hook(
        lambda _, args, kwargs: _with_hidden(args, kwargs, next(inputs)),
        with_kwargs=True,
        prepend=True,
    )
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(below):
            layers[i] = layer


def hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's hidden-state input, passed by position or by name."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def watching(
    layers: nn.ModuleList, watched: Sequence[int], keep: Callable[[int, torch.Tensor], None]
) -> Iterator[list[bool]]:
    """While it lasts, `keep(i, input)` gets the input (detached) of `layers[i]` for each i in
    `watched`, on every forward; the list it yields holds whether a layer returns a tuple, once
    `layers[0]` has run (what a `Passthrough` standing in for one must return)."""
    form: list[bool] = []

    def take(i: int) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep(i, hidden_input(args, kwargs).detach())

        return hook

    def shape(_: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        form[:] = [isinstance(output, tuple)]

    handles = [layers[i].register_forward_pre_hook(take(i), with_kwargs=True) for i in watched]
    handles.append(layers[0].register_forward_hook(shape, with_kwargs=True))
    try:
        yield form
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class _Packed:
    """A frozen layer's keys or values (rows, heads, positions, dim) as the prefill computed
    them: the common prefix once, each distinct prompt's own columns once. The cache generation
    reads holds them copied out to every row; kept so, a batch of G samples of a few-shot prompt
    would take about G x (prompts) x (prefix) positions instead of (prefix) + (own)."""

    common: torch.Tensor | None  # (1, heads, common, dim)
    own: torch.Tensor  # (distinct, heads, own columns, dim); every row's when `index` is None
    index: torch.Tensor | None  # each row's distinct prompt

    @staticmethod
    def of(t: torch.Tensor, shared: prefix.Shared) -> _Packed:
        c, index = shared.common, shared.index
        first = None if index is None else _first_rows(index, shared.distinct)
        own = t[:, :, c:] if first is None else t[first, :, c:]
        common = t[:1, :, :c].clone() if c else None
        return _Packed(common, own.contiguous() if first is None else own, index)

    def unpack(self) -> torch.Tensor:
        own = self.own if self.index is None else self.own[self.index]
        if self.common is None:
            return own
        return torch.cat([self.common.expand(own.shape[0], -1, -1, -1), own], dim=2)

    @property
    def nbytes(self) -> int:
        parts = [self.own] if self.common is None else [self.own, self.common]
        return sum(t.numel() * t.element_size() for t in parts)


def _first_rows(index: torch.Tensor, distinct: int) -> torch.Tensor:
    """The first row of each distinct prompt."""
    rows = torch.arange(index.shape[0], device=index.device)
    first = torch.full((distinct,), index.shape[0], dtype=torch.long, device=index.device)
    return first.scatter_reduce(0, index, rows, reduce="amin")


@dataclass
class _Prefilled:
    """One prompt batch's prefill, valid for runs whose lowest trained layer is <= `depth`."""

    depth: int
    inputs: list[list[torch.Tensor]]  # per forward of the prefill: layers[0..depth]'s inputs
    layers: list[tuple[Any, _Packed, _Packed]]  # the cache's layers [0, depth): keys, values
    as_tuple: bool

    @property
    def nbytes(self) -> int:
        size = sum(t.numel() * t.element_size() for call in self.inputs for t in call)
        return size + sum(k.nbytes + v.nbytes for _, k, v in self.layers)

    def cache_layer(self, i: int) -> Any:
        layer, keys, values = self.layers[i]
        layer = copy.copy(layer)
        layer.keys, layer.values = keys.unpack(), values.unpack()
        return layer


@dataclass
class FrozenStates:
    """A study's store of prompt-batch prefills on the base weights below the trained layers.

    Only for runs that start from the base weights (a search's trials put back what they
    trained): a run whose layers below its lowest trained one differ from those the states
    were taken on would replay stale states. Bounded by `limit_mb`; a batch that would pass it
    is not kept and prefills as usual.
    """

    limit_mb: float = 1024.0
    entries: dict[tuple[Any, ...], _Prefilled] = field(default_factory=dict)
    hits: int = 0
    nbytes: int = 0

    def put(self, key: tuple[Any, ...], entry: _Prefilled) -> None:
        old = self.entries.get(key)
        held = self.nbytes - (old.nbytes if old is not None else 0)
        if held + entry.nbytes <= self.limit_mb * 2**20:
            self.entries[key] = entry
            self.nbytes = held + entry.nbytes


@dataclass(frozen=True)
class Frozen:
    """One run's view of the store: its decoder stack and its lowest trained layer."""

    states: FrozenStates
    layers: nn.ModuleList
    lowest: int


def _key(ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
    """A prompt batch as laid out, and the precision it runs in (autocast changes the states)."""
    device = ids.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (
        tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes(),
        str(ids.device), str(autocast),
    )  # fmt: skip


def prefill_below(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, frozen: Frozen | None
) -> prefix.Shared | None:
    """`prefix.prefill`, with the layers below `frozen.lowest` taken from the store when it
    holds this batch deep enough, else run and kept for later runs."""
    if frozen is None or frozen.lowest == 0 or frozen.states.limit_mb <= 0:
        return prefix.prefill(model, ids, mask)
    states, layers, lowest = frozen.states, frozen.layers, frozen.lowest
    key = _key(ids, mask)
    entry = states.entries.get(key)
    if entry is not None and entry.depth >= lowest:
        inputs = iter([call[lowest] for call in entry.inputs])
        with replaying(layers, lowest, entry.as_tuple, inputs):
            shared = prefix.prefill(model, ids, mask)
        if shared is not None:  # it was shared when kept; the same batch is shared again
            states.hits += 1
            for i in range(lowest):  # the real keys and values for the placeholders
                shared.cache.layers[i] = entry.cache_layer(i)
            return shared
    calls: list[list[torch.Tensor]] = []

    def keep(i: int, hidden: torch.Tensor) -> None:
        if i == 0:
            calls.append([])
        calls[-1].append(hidden)

    with watching(layers, range(lowest + 1), keep) as form:
        shared = prefix.prefill(model, ids, mask)
    if shared is None or not form:
        return shared
    kept = []
    for layer in shared.cache.layers[:lowest]:
        keys = getattr(layer, "keys", None)  # a linear-attention layer keeps no keys
        if keys is None or keys.shape[2] != ids.shape[1] - 1:  # or a sliding window dropped some
            return shared
        # the layer without its tensors (they are packed), put back whole on each use; a
        # DynamicCache's layers replace their tensors as they grow, never write into them
        stub = copy.copy(layer)
        stub.keys = stub.values = None
        kept.append((stub, _Packed.of(layer.keys, shared), _Packed.of(layer.values, shared)))
    states.put(key, _Prefilled(lowest, calls, kept, form[0]))
    return shared
