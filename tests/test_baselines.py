"""The free heuristics' picks (autolayer.baselines)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autolayer.baselines import layer_snr, matrix_snr, picks


def test_matrix_snr_by_hand() -> None:
    """diag(10, 1, 1, 1): IQR of the singular values 3.25 - 1 (linear quantiles), sigma 2.25 /
    1.349, edge 2 sigma = 3.34; signal 10, noise 3, SNR (10 / 3) / 10."""
    assert matrix_snr(torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0]))) == pytest.approx(1 / 3)
    # diag(10, 10, 1, 1): sigma 9 / 1.349 puts the edge at 13.3, so nothing is signal
    assert matrix_snr(torch.diag(torch.tensor([10.0, 10.0, 1.0, 1.0]))) == 0.0


class Block(nn.Module):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            self.proj.weight.copy_(torch.diag(torch.tensor(values)))


def test_layer_scores_normalise_per_matrix_type_and_ignore_1d_weights() -> None:
    # SNRs 1/3, 0 and (10 / 7) / 10 (diag 10, 5, 1, 1: edge 7.78); bias and norm weights ignored
    layers = [Block([10, 1, 1, 1]), Block([10, 10, 1, 1]), Block([10, 5, 1, 1])]
    assert layer_snr(layers) == pytest.approx([1.0, 0.0, (1 / 7) / (1 / 3)])


def test_single_layer_picks_on_eight_layers() -> None:
    snr = [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    chosen = picks("single_layer", (0, 7), 1, snr, seed=0)
    assert chosen["middle"] == (3,)  # Mid-1 of 8: floor(8/2 - 1/2)
    assert chosen["last"] == (7,)
    assert chosen["spectrum"] == (1,)
    assert chosen["random"] == picks("single_layer", (0, 7), 1, snr, seed=0)["random"]


def test_single_layer_picks_stay_on_a_stride() -> None:
    snr = [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.8, 0.7, 0.0]
    for seed in range(5):
        chosen = picks("single_layer", (0, 8), 1, snr, seed=seed, stride=2)
        assert chosen["middle"] == (4,) and chosen["last"] == (8,)
        assert chosen["spectrum"] == (6,)  # layer 1 scores higher but is off the grid 0, 2, ..8
        assert chosen["random"][0] % 2 == 0


def test_window_picks_stay_contiguous_and_inside_the_bounds() -> None:
    snr = [9.0, 9.0, 0.1, 0.2, 0.8, 0.9, 0.1, 0.1]
    for seed in range(20):
        chosen = picks("window", (2, 6), 2, snr, seed=seed)
        for layers in chosen.values():
            assert len(layers) == 2 and layers[1] == layers[0] + 1
            assert layers[0] >= 2 and layers[1] <= 6
    assert chosen["spectrum"] == (4, 5)  # the best window inside 2..6 (layers 0-1 are outside)
    assert chosen["last"] == (5, 6)
    assert chosen["middle"] == (3, 4)


def test_subset_spectrum_takes_the_top_layers_and_no_snr_leaves_it_out() -> None:
    snr = [0.5, 0.1, 0.9, 0.8, 0.2, 0.3]
    assert picks("subset", (0, 5), 2, snr, seed=0)["spectrum"] == (2, 3)
    assert "spectrum" not in picks("subset", (0, 5), 2, None, seed=0)
