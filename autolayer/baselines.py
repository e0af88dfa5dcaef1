"""The free heuristics a search has to beat, picked without any RL run.

- middle: the middle layer(s) of the eligible range (Mid-k of arXiv 2607.01232);
- last: the last layer(s), LLaMA-Factory's "freeze tuning" default;
- spectrum: Spectrum's data-free signal-to-noise ranking (arXiv 2406.06623);
- random: a uniformly drawn candidate, seeded by the search seed.

Each is a candidate of the same kind and size as the search's pick, so the search measures it
like any other and the results show it beside the pick.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from autolayer.layers import middle_layers

NAMES = ("middle", "last", "spectrum", "random")
IQR_TO_SIGMA = 1.349  # the interquartile range of a standard normal


def matrix_snr(weight: torch.Tensor) -> float:
    """Spectrum's SNR of one weight matrix: singular values above the Marchenko-Pastur edge
    sigma (1 + sqrt(beta)) are signal (sigma from the IQR of the singular values, beta the aspect
    ratio), SNR = (sum of signal / sum of noise) / largest singular value."""
    values = torch.linalg.svdvals(weight.detach().float())
    q25, q75 = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device))
    sigma = float(q75 - q25) / IQR_TO_SIGMA
    rows, cols = weight.shape
    edge = sigma * (1 + (min(rows, cols) / max(rows, cols)) ** 0.5)
    signal, noise = float(values[values > edge].sum()), float(values[values <= edge].sum())
    if noise == 0:
        return float("inf")
    return signal / noise / float(values.max())


def layer_snr(layers: Sequence[nn.Module]) -> list[float]:
    """One data-free score per decoder layer.

    Spectrum ranks matrices within each module type (q_proj, up_proj, ...). A layer's score here is
    the mean over its module types of the matrix's SNR divided by that type's largest SNR across
    layers, so every type weighs the same. 1-D weights (norms, biases) are left out: their SNR is
    undefined and Spectrum's infinite values for them would tie every layer at the top.
    """
    per_type: dict[str, list[float]] = {}
    for layer in layers:
        for name, param in layer.named_parameters():
            if param.ndim == 2:
                per_type.setdefault(name, []).append(matrix_snr(param))
    scores = [0.0] * len(layers)
    for values in per_type.values():
        if len(values) != len(layers):
            continue  # a type that only some layers have (hybrid stacks) cannot rank them all
        top = max(values)
        for i, value in enumerate(values):
            scores[i] += (value / top if top > 0 else 0.0) / len(per_type)
    return scores


def picks(
    kind: str,
    bounds: tuple[int, int],
    size: int,
    snr: Sequence[float] | None,
    seed: int,
    stride: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Each heuristic's candidate of `size` layers among the eligible `bounds` (inclusive), every
    `stride`-th from the lowest (a single_layer space's stride: the heuristics pick among the
    layers the search may pick).

    A window kind gets contiguous candidates (Spectrum's is the window of highest mean score);
    single_layer and subset get Spectrum's top `size` layers. Spectrum is left out without scores.
    """
    lo, hi = bounds
    eligible = list(range(lo, hi + 1, stride))
    size = min(size, len(eligible))
    chosen = {
        "middle": tuple(eligible[i] for i in middle_layers(len(eligible), size)),
        "last": tuple(eligible[-size:]),
    }
    if snr is not None:
        if kind == "window":
            start = max(range(lo, hi - size + 2), key=lambda s: sum(snr[s : s + size]))
            chosen["spectrum"] = tuple(range(start, start + size))
        else:
            ranked = sorted(eligible, key=lambda layer: -snr[layer])
            chosen["spectrum"] = tuple(sorted(ranked[:size]))
    rng = random.Random(seed)
    if kind == "window":
        start = rng.randint(lo, hi - size + 1)
        chosen["random"] = tuple(range(start, start + size))
    else:
        chosen["random"] = tuple(sorted(rng.sample(eligible, size)))
    return chosen
