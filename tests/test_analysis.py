"""Every update metric against a hand computation on small literal matrices."""

from __future__ import annotations

import math

import pytest
import torch

from autolayer.analysis import (
    bf16_dropped,
    low_magnitude_mask,
    normalized_spectral_shift,
    overlap,
    principal_angles,
    principal_mask,
    relative_update_norm,
    run_overlap,
    sparsity,
    update_mask_abs,
    update_mask_rel,
)


def t(*rows: object) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_the_two_sparsity_probes_by_hand() -> None:
    # in bf16: 2.01 -> 2.015625 (spacing 1/64 near 2): changed by both probes;
    # 0.5 + 1e-6 -> 0.5: unchanged; 1e-6 -> 2e-6: |delta| ~ 1e-6 <= 1e-5, so the absolute probe
    # calls it unchanged, while 1e-6 > 1e-3 * 2e-6, so the relative probe calls it changed
    w0, w1 = t(1.0, 2.0, 0.5, 1e-6), t(1.0, 2.01, 0.5 + 1e-6, 2e-6)
    assert update_mask_abs(w0, w1).tolist() == [False, True, False, False]
    assert update_mask_rel(w0, w1).tolist() == [False, True, False, True]
    assert sparsity(update_mask_abs(w0, w1)) == 0.75
    assert sparsity(update_mask_rel(w0, w1)) == 0.5


def test_relative_norm_and_spectral_shift_by_hand() -> None:
    # ||diag(3, 4)||_F = 5; the update [[0, .3], [.4, 0]] has norm 0.5: 0.1
    w0 = t([3.0, 0.0], [0.0, 4.0])
    assert relative_update_norm(w0, w0 + t([0.0, 0.3], [0.4, 0.0])) == pytest.approx(0.1)
    # sigma(w0) = (4, 3), sigma(diag(3, 4.5)) = (4.5, 3): ||(0.5, 0)|| / ||(4, 3)|| = 0.1
    assert normalized_spectral_shift(w0, t([3.0, 0.0], [0.0, 4.5])) == pytest.approx(0.1)


def test_principal_angles_by_hand() -> None:
    w0 = t([2.0, 0.0], [0.0, 1.0])  # top left singular vector e1
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rotated = t([c, -s], [s, c]) @ w0  # its top left singular vector is e1 turned by 30 degrees
    assert principal_angles(w0, rotated, 1).tolist() == pytest.approx([math.pi / 6])
    swapped = t([1.0, 0.0], [0.0, 2.0])  # top vector e2: orthogonal
    assert principal_angles(w0, swapped, 1).tolist() == pytest.approx([math.pi / 2])
    assert principal_angles(w0, swapped, 2).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert principal_angles(w0, rotated, 1, side="right").tolist() == pytest.approx([0.0])


def test_principal_angles_come_in_ascending_order() -> None:
    w0 = t([3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0])  # top-2 left subspace: e1, e2
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    tilted = t([1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]) @ w0  # e1 kept, e2 turned 30 degrees
    angles = principal_angles(w0, tilted, 2).tolist()
    assert angles == pytest.approx([0.0, math.pi / 6], abs=1e-6)


def test_principal_and_low_magnitude_masks_by_hand() -> None:
    w0 = t([4.0, 0.0], [0.0, 1.0])  # rank-1 reconstruction: [[4, 0], [0, 0]]
    assert principal_mask(w0, 1, 0.25).tolist() == [[True, False], [False, False]]
    assert low_magnitude_mask(t([4.0, 0.5], [0.1, 1.0]), 0.5).tolist() == [
        [False, True],
        [True, False],
    ]


def test_overlaps_against_chance_by_hand() -> None:
    update = torch.tensor([True, True, False, False])
    assert overlap(update, torch.tensor([True, False, False, False])) == (0.5, 0.25)
    m1, m2 = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    # |m1 & m2| = 1, |m1| = |m2| = 2, |m1 | m2| = 3; densities 0.5 and 0.5
    # chance Jaccard = p1 p2 / (p1 + p2 - p1 p2) = 0.25 / 0.75
    assert run_overlap(m1, m2) == pytest.approx(
        {"o1": 0.5, "o1_chance": 0.5, "o2": 0.5, "o2_chance": 0.5,
         "jaccard": 1 / 3, "jaccard_chance": 1 / 3}
    )  # fmt: skip


def test_bf16_drops_updates_below_half_a_ulp_by_hand() -> None:
    # near 1.0 a bf16 ULP is 2^-7 = 0.0078: +1e-4 rounds away, +0.01 survives; 2.0 is unchanged
    w0, w1 = t(1.0, 1.0, 2.0), t(1.0 + 1e-4, 1.01, 2.0)
    assert bf16_dropped(w0, w1) == 0.5
    assert bf16_dropped(w0, w0) == 0.0
