"""A cheap pre-search signal: which layers one short all-layers run moves the most.

One proxy run trains every layer for a few steps. Per layer it records the relative update norm
||W_after - W_before|| / ||W_before|| over the layer's parameters and the root-sum-square of the
gradient norms it received. Layers ranked by the update norm are an optional warm-start order for
the search (`search.signal_steps`). It costs one short run instead of L, and whether it predicts
the search's C is measured, not assumed (`benchmarks/profiles.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from autolayer.config import ProxyConfig
from autolayer.loading import Workload
from autolayer.models import find_layer_stack, layer_param_names, restore, snapshot
from autolayer.proxy import run_proxy


@dataclass(frozen=True)
class LayerSignal:
    layer: int
    update_norm: float  # ||dW|| / ||W|| over the layer's parameters
    grad_norm: float  # sqrt of the summed squared gradient norms over the run


def layer_signal(work: Workload, config: ProxyConfig, steps: int, lr: float) -> list[LayerSignal]:
    """Train all layers for `steps` steps, measure each, and put the model back as it was."""
    model = work.model
    num_layers = len(find_layer_stack(model))
    names = {layer: layer_param_names(model, [layer]) for layer in range(num_layers)}
    saved = snapshot(model, [n for group in names.values() for n in group])
    params = dict(model.named_parameters())
    squared = dict.fromkeys(range(num_layers), 0.0)

    def hook_for(layer: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            squared[layer] += float(grad.detach().float().norm() ** 2)

        return hook

    for group in names.values():
        for n in group:
            params[n].requires_grad_(True)  # a hook needs it; the run trains these anyway
    handles = [params[n].register_hook(hook_for(layer)) for layer, g in names.items() for n in g]
    short = dataclasses.replace(config, steps=steps, eval_every=steps)
    try:
        run_proxy(work, short, range(num_layers), lr)
        signals = []
        for layer, group in names.items():
            delta = sum(float((params[n].detach() - saved[n]).float().norm() ** 2) for n in group)
            base = sum(float(saved[n].float().norm() ** 2) for n in group)
            signals.append(LayerSignal(layer, (delta / base) ** 0.5, squared[layer] ** 0.5))
        return signals
    finally:
        for handle in handles:
            handle.remove()
        restore(model, saved)


def ranking(signals: list[LayerSignal], by: str = "update_norm") -> list[int]:
    """Layers by `update_norm` (the warm-start order) or `grad_norm`, largest first."""
    return [s.layer for s in sorted(signals, key=lambda s: -float(getattr(s, by)))]
