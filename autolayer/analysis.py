"""What RL changed in a weight matrix: sparsity, norms, spectrum, subspaces and masks.

Pure functions on a base matrix `w0` and a trained one `w1` of the same shape; each cites the
paper that defines it. They are the measurements behind "RL updates a sparse, reproducible
subnetwork" (arXiv 2505.11711) and the Three-Gate account of why (arXiv 2511.08567).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ABS_TOL = 1e-5  # arXiv 2505.11711: a weight is unchanged if |w1 - w0| <= 1e-5, compared in bf16
REL_TOL = 1e-3  # arXiv 2511.08567: unchanged if |w1 - w0| <= 1e-3 * max(|w0|, |w1|), in bf16


def _bf16(w: Tensor) -> Tensor:
    """The value a bf16 checkpoint would store, back in fp32 for exact arithmetic."""
    return w.detach().to(torch.bfloat16).to(torch.float32)


def update_mask_abs(w0: Tensor, w1: Tensor, tol: float = ABS_TOL) -> Tensor:
    """True where the weight changed, by the absolute probe of arXiv 2505.11711 (both in bf16)."""
    return (_bf16(w1) - _bf16(w0)).abs() > tol


def update_mask_rel(w0: Tensor, w1: Tensor, tol: float = REL_TOL) -> Tensor:
    """True where the weight changed, by the relative probe of arXiv 2511.08567 (both in bf16):
    unchanged if |w1 - w0| <= tol * max(|w0|, |w1|)."""
    a, b = _bf16(w0), _bf16(w1)
    return (b - a).abs() > tol * torch.maximum(a.abs(), b.abs())


def sparsity(mask: Tensor) -> float:
    """Share of unchanged weights (the papers' "update sparsity")."""
    return 1.0 - float(mask.float().mean())


def relative_update_norm(w0: Tensor, w1: Tensor) -> float:
    """||w1 - w0||_F / ||w0||_F."""
    return float((w1 - w0).float().norm() / w0.float().norm())


def normalized_spectral_shift(w0: Tensor, w1: Tensor) -> float:
    """NSS = ||sigma(w1) - sigma(w0)||_2 / ||sigma(w0)||_2 (arXiv 2511.08567, Gate II)."""
    s0 = torch.linalg.svdvals(w0.double())
    s1 = torch.linalg.svdvals(w1.double())
    return float((s1 - s0).norm() / s0.norm())


def principal_angles(w0: Tensor, w1: Tensor, k: int, side: str = "left") -> Tensor:
    """Principal angles (radians, ascending) between the top-k left (or right) singular
    subspaces of w0 and w1 (arXiv 2511.08567): arccos of the singular values of U0_k^T U1_k."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    u0, _, v0h = torch.linalg.svd(w0.double(), full_matrices=False)
    u1, _, v1h = torch.linalg.svd(w1.double(), full_matrices=False)
    a, b = (u0[:, :k], u1[:, :k]) if side == "left" else (v0h[:k].T, v1h[:k].T)
    cosines = torch.linalg.svdvals(a.T @ b).clamp(-1.0, 1.0)  # descending: angles ascend
    return torch.arccos(cosines)


def _top_share(scores: Tensor, alpha: float, largest: bool) -> Tensor:
    """Mask of the `alpha` share of entries with the largest (or smallest) scores."""
    n = max(1, round(alpha * scores.numel()))
    index = scores.flatten().topk(n, largest=largest).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[index] = True
    return mask.view_as(scores)


def principal_mask(w0: Tensor, k: int, alpha: float) -> Tensor:
    """The top-alpha entries of |rank-k reconstruction of w0| (arXiv 2511.08567)."""
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    low_rank = (u[:, :k] * s[:k]) @ vh[:k]
    return _top_share(low_rank.abs(), alpha, largest=True)


def low_magnitude_mask(w0: Tensor, alpha: float) -> Tensor:
    """The alpha share of entries with the smallest |w0| (arXiv 2511.08567)."""
    return _top_share(w0.abs().double(), alpha, largest=False)


def overlap(update: Tensor, other: Tensor) -> tuple[float, float]:
    """(|update & other| / |update|, chance): the share of updated entries inside `other`, and
    what independent masks would give, the density of `other` (arXiv 2511.08567)."""
    updated = int(update.sum())
    inside = int((update & other).sum()) / updated if updated else 0.0
    return inside, float(other.float().mean())


def run_overlap(mask1: Tensor, mask2: Tensor) -> dict[str, float]:
    """o1 = |I1 & I2| / |I1|, o2 = |I1 & I2| / |I2| (arXiv 2505.11711) and Jaccard
    |I1 & I2| / |I1 | I2| (arXiv 2511.08567), each with its chance level for independent masks
    of the same densities p1, p2: o1 -> p2, o2 -> p1, Jaccard -> p1 p2 / (p1 + p2 - p1 p2)."""
    both = int((mask1 & mask2).sum())
    n1, n2, union = int(mask1.sum()), int(mask2.sum()), int((mask1 | mask2).sum())
    p1, p2 = float(mask1.float().mean()), float(mask2.float().mean())
    joint = p1 + p2 - p1 * p2
    return {
        "o1": both / n1 if n1 else 0.0,
        "o1_chance": p2,
        "o2": both / n2 if n2 else 0.0,
        "o2_chance": p1,
        "jaccard": both / union if union else 0.0,
        "jaccard_chance": p1 * p2 / joint if joint else 0.0,
    }


def bf16_dropped(w0: Tensor, w1: Tensor) -> float:
    """Share of the weights an fp32 run changed whose change a bf16 copy would lose: the update
    is below half a bf16 ULP of the weight, so bf16(w1) == bf16(w0) (Gate III, arXiv
    2511.08567). 0 when nothing changed."""
    changed = w1 != w0
    lost = changed & (_bf16(w1) == _bf16(w0))
    n = int(changed.sum())
    return int(lost.sum()) / n if n else 0.0


# --- a whole update: per matrix, per layer, and between two runs ----------------------------------


@dataclass(frozen=True)
class MatrixReport:
    """The metrics of one trained parameter (spectral ones only for matrices)."""

    name: str
    layer: int | None
    numel: int
    sparsity_abs: float
    sparsity_rel: float
    relative_norm: float
    bf16_dropped: float
    nss: float | None = None
    max_angle_deg: float | None = None  # largest principal angle of the top-k left subspaces
    principal_overlap: float | None = None
    low_magnitude_overlap: float | None = None
    mask_chance: float | None = None  # alpha: the overlap independent masks would have


def layer_of(name: str, stack_path: str) -> int | None:
    """The decoder-layer index in a parameter name (`model.layers.3.mlp...` -> 3)."""
    prefix = stack_path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def analyze_matrix(
    name: str, w0: Tensor, w1: Tensor, layer: int | None, k: int, alpha: float
) -> MatrixReport:
    w0, w1 = w0.detach().float().cpu(), w1.detach().float().cpu()
    update = update_mask_abs(w0, w1)
    base = dict(
        name=name,
        layer=layer,
        numel=w0.numel(),
        sparsity_abs=sparsity(update),
        sparsity_rel=sparsity(update_mask_rel(w0, w1)),
        relative_norm=relative_update_norm(w0, w1),
        bf16_dropped=bf16_dropped(w0, w1),
    )
    if w0.dim() != 2:
        return MatrixReport(**base)  # type: ignore[arg-type]
    k = max(1, min(k, *w0.shape))
    return MatrixReport(
        **base,  # type: ignore[arg-type]
        nss=normalized_spectral_shift(w0, w1),
        max_angle_deg=float(principal_angles(w0, w1, k).max()) * 180 / math.pi,
        principal_overlap=overlap(update, principal_mask(w0, k, alpha))[0],
        low_magnitude_overlap=overlap(update, low_magnitude_mask(w0, alpha))[0],
        mask_chance=alpha,
    )


def by_layer(reports: Sequence[MatrixReport]) -> list[dict[str, float | int | None]]:
    """Per layer: parameters, the numel-weighted sparsities, and the update norm of the layer."""
    layers = sorted({r.layer for r in reports if r.layer is not None})
    rows: list[dict[str, float | int | None]] = []
    for layer in layers:
        mine = [r for r in reports if r.layer == layer]
        total = sum(r.numel for r in mine)
        rows.append(
            {
                "layer": layer,
                "params": total,
                "sparsity_abs": sum(r.sparsity_abs * r.numel for r in mine) / total,
                "sparsity_rel": sum(r.sparsity_rel * r.numel for r in mine) / total,
                "max_relative_norm": max(r.relative_norm for r in mine),
            }
        )
    return rows


def compare_updates(
    base: Mapping[str, Tensor], first: Mapping[str, Tensor], second: Mapping[str, Tensor]
) -> dict[str, float]:
    """o1, o2 and Jaccard (with chance) of two runs' update masks over their shared params."""
    names = sorted(set(first) & set(second) & set(base))
    if not names:
        raise ValueError("the two runs share no trained parameter")
    m1 = torch.cat([update_mask_abs(base[n].float(), first[n].float()).flatten() for n in names])
    m2 = torch.cat([update_mask_abs(base[n].float(), second[n].float()).flatten() for n in names])
    return run_overlap(m1, m2)
