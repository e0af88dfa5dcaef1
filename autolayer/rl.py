"""GRPO, Dr. GRPO and GiGPO as pure functions: group advantages, masks, log-probs, KL, the loss.

Conventions follow TRL 1.x (`GRPOTrainer`, `loss_type="grpo"` / `"dr_grpo"`) so a proxy run here
and the final TRL run optimise the same objective. Shapes: N completions (= B prompts x G
generations, prompt-major), T completion tokens, V vocabulary entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Algorithm = Literal["grpo", "dr_grpo"]  # loss reductions; gigpo uses grpo's (per sequence)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}.")


def group_advantages(
    rewards: Tensor, num_generations: int, algorithm: Algorithm, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages, one per completion.

    GRPO (DeepSeekMath, arXiv 2402.03300, §4.1.2 outcome supervision): `A_i = (r_i - mean(r)) /
    (std(r) + eps)` within each prompt's group of G completions. Dr. GRPO (arXiv 2503.20783,
    Fig. 1): `A_i = r_i - mean(r)`, since dividing by the std over-weights too-easy and too-hard
    prompts. The std is the unbiased (Bessel-corrected) one, `torch.std`'s
    default, as TRL uses; a zero-variance group gets advantage 0 because `eps > 0`.

    `rewards` is `(B*G,)` in prompt-major order (the G completions of prompt 0 first); returns
    `(B*G,)` in the same order.
    """
    _check_algorithm(algorithm)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}.")
    if num_generations < 2:  # the unbiased std of one sample is undefined; TRL also needs G >= 2
        raise ValueError(f"num_generations must be at least 2, got {num_generations}.")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"{rewards.numel()} rewards is not a multiple of num_generations={num_generations}."
        )
    if algorithm == "grpo" and eps <= 0:
        raise ValueError(f"eps must be > 0 so zero-variance groups get advantage 0, got {eps}.")
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if algorithm == "grpo":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@dataclass(frozen=True)
class AgentStep:
    """One action of a multi-turn trajectory: a row of the loss."""

    group: int  # episode group: the G trajectories that start from the same initial state
    trajectory: int  # which trajectory of the batch the step belongs to
    anchor: str  # the observation the action answered: GiGPO's anchor state
    reward: float  # the environment's reward for this step


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """`R_t = sum_{j >= t} gamma^(j - t) r_j` of one trajectory (arXiv 2505.10978, Eq. 5)."""
    out: list[float] = []
    running = 0.0
    for reward in reversed(rewards):
        running = reward + gamma * running
        out.append(running)
    return out[::-1]


def _by_trajectory(steps: Sequence[AgentStep]) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        rows.setdefault(step.trajectory, []).append(i)
    return rows


def _relative(values: list[float], std_norm: bool, eps: float) -> list[float]:
    """Each value minus the group mean, divided by the unbiased std (+ eps) when `std_norm`."""
    t = torch.tensor(values, dtype=torch.float64)
    centred = t - t.mean()
    if std_norm and len(values) > 1:
        centred = centred / (t.std() + eps)
    return centred.tolist()


def episode_advantages(
    steps: Sequence[AgentStep], std_norm: bool, eps: float = 1e-4
) -> dict[int, float]:
    """Trajectory -> its episode return relative to its group's (each trajectory counted once).

    GRPO (`std_norm`) and Dr. GRPO on trajectories, and GiGPO's episode-level advantage A_E
    (arXiv 2505.10978, Eq. 3). verl-agent's default instead averages over every step row of the
    group (longer trajectories weigh more); we follow the paper's per-trajectory equation here.
    """
    rows_of = _by_trajectory(steps)
    returns = {t: sum(steps[i].reward for i in rows) for t, rows in rows_of.items()}
    groups: dict[int, list[int]] = {}
    for t, rows in rows_of.items():
        groups.setdefault(steps[rows[0]].group, []).append(t)
    out: dict[int, float] = {}
    for members in groups.values():
        for t, a in zip(
            members, _relative([returns[t] for t in members], std_norm, eps), strict=True
        ):
            out[t] = a
    return out


def trajectory_advantages(steps: Sequence[AgentStep], algorithm: str, eps: float = 1e-4) -> Tensor:
    """GRPO / Dr. GRPO on trajectories: every step of a trajectory gets its episode advantage."""
    _check_algorithm(algorithm)
    per_trajectory = episode_advantages(steps, std_norm=algorithm == "grpo", eps=eps)
    return torch.tensor([per_trajectory[s.trajectory] for s in steps], dtype=torch.float32)


def gigpo_advantages(
    steps: Sequence[AgentStep],
    gamma: float,
    omega: float,
    std_norm: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """GiGPO (arXiv 2505.10978): `A = A_E + omega * A_S` per step (Eq. 8).

    A_E: the episode advantage (Eq. 3). A_S (Eqs. 5-7): each step's discounted return minus the
    mean over its step group, the steps of one episode group whose anchor observations are
    identical. Choices the paper leaves open follow verl-agent's `core_gigpo.py`: a step group
    may hold several steps of one trajectory (a revisited state); a singleton group gets A_S = 0;
    normalisation is `mean_norm` (no std division) unless `std_norm`, whose std is the unbiased
    one with a singleton's std taken as 1.
    """
    a_e = episode_advantages(steps, std_norm, eps)
    step_returns = [0.0] * len(steps)
    for rows in _by_trajectory(steps).values():
        for i, r in zip(
            rows, discounted_returns([steps[i].reward for i in rows], gamma), strict=True
        ):
            step_returns[i] = r
    clusters: dict[tuple[int, str], list[int]] = {}
    for i, step in enumerate(steps):
        clusters.setdefault((step.group, step.anchor), []).append(i)
    a_s = [0.0] * len(steps)
    for rows in clusters.values():
        for i, a in zip(
            rows, _relative([step_returns[i] for i in rows], std_norm, eps), strict=True
        ):
            a_s[i] = a
    return torch.tensor(
        [a_e[s.trajectory] + omega * a_s[i] for i, s in enumerate(steps)], dtype=torch.float32
    )


def completion_mask(
    completion_ids: Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
) -> Tensor:
    """Float mask `(N, T)` of the tokens a completion really produced.

    1 up to and including the first EOS (any id in `eos_token_id`), 0 after it, as TRL masks
    completions; a row without EOS (truncated at the length limit) is all ones. With
    `pad_token_id`, pad tokens before the first EOS are masked too (completions padded without an
    EOS), but the first EOS itself stays 1 even when the pad id equals the EOS id.
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be 2-D (N, T), got {tuple(completion_ids.shape)}.")
    n, t = completion_ids.shape
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), t)  # t: past the end, keep all
    positions = torch.arange(t, device=completion_ids.device).expand(n, t)
    keep = positions <= first_eos.unsqueeze(1)
    if pad_token_id is not None:
        keep &= (completion_ids != pad_token_id) | (positions == first_eos.unsqueeze(1))
    return keep.float()


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities `(N, T)` of `target_ids` under `softmax(logits / temperature)`.

    `logits[:, t]` must already predict `target_ids[:, t]` (the caller drops the last position and
    the prompt). The temperature is the sampling temperature, so these match the distribution the
    completions were drawn from (TRL divides the same way). One sequence at a time, upcast to at
    least float32 so bf16 logits keep an accurate normaliser: under `no_grad` the extra memory is
    one `(T, V)` row, never an `(N, T, V)` float32/float64 copy; with grad, autograd keeps each
    row's float32 log-softmax for backward, as any log_softmax + gather does. Returns float32
    (float64 for float64 logits).
    """
    if logits.dim() != 3 or logits.shape[:2] != target_ids.shape:
        raise ValueError(
            f"logits (N, T, V) and target_ids (N, T) disagree: "
            f"{tuple(logits.shape)} vs {tuple(target_ids.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_targets in zip(logits, target_ids, strict=True):
        log_probs = (row_logits.to(dtype) / temperature).log_softmax(dim=-1)
        rows.append(log_probs.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))
    if not rows:
        return logits.new_zeros(target_ids.shape, dtype=dtype)
    return torch.stack(rows)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020).

    `exp(q - p) - (q - p) - 1` with `p = logp`, `q = ref_logp`: unbiased for samples from pi,
    and >= 0 for every token because `e^x >= 1 + x`. DeepSeekMath eq. 4 uses the same form.
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass(frozen=True)
class LossOutput:
    """The loss to backpropagate and two detached diagnostics."""

    loss: Tensor
    """Scalar to call `.backward()` on."""
    kl: Tensor
    """Mean per-token k3 KL over active tokens of the batch; 0 when `beta == 0`."""
    clip_fraction: Tensor
    """Fraction of active tokens whose clipped term won the min (their gradient is zero)."""


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the active tokens of the whole batch (0 when none are active)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _check_policy_inputs(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    algorithm: str,
    beta: float,
    ref_logp: Tensor | None,
    max_completion_length: int | None,
) -> None:
    _check_algorithm(algorithm)
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one (N, T) shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}."
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be (N,)={tuple(logp.shape[:1])}, got {tuple(advantages.shape)}."
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 adds a KL penalty to the reference model, so pass ref_logp.")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}.")
    if max_completion_length is not None and max_completion_length < max(1, logp.shape[1]):
        raise ValueError(
            f"max_completion_length={max_completion_length} is shorter than the "
            f"{logp.shape[1]} completion tokens given."
        )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    algorithm: Algorithm,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    max_completion_length: int | None = None,
) -> LossOutput:
    """Clipped-surrogate policy loss of GRPO or Dr. GRPO.

    Per token (DeepSeekMath eq. 3): `rho = exp(logp - old_logp)`, `l = -(min(rho*A,
    clip(rho, 1-eps, 1+eps)*A) - beta * k3_kl(logp, ref_logp))`. Reduction:
    grpo averages `l` over each sequence's active tokens, then over the N sequences (a sequence
    with no active token contributes 0); dr_grpo (arXiv 2503.20783, Fig. 1; TRL `dr_grpo`) sums
    `l` over all active tokens and divides by the constant `N * max_completion_length` (default T),
    removing GRPO's length bias. `old_logp` and `ref_logp` are detached here.

    Shapes: `logp`, `old_logp`, `mask`, `ref_logp` are `(N, T)`; `advantages` is `(N,)`.
    """
    _check_policy_inputs(
        logp, old_logp, advantages, mask, algorithm, beta, ref_logp, max_completion_length
    )
    active = mask > 0
    mask = mask.to(logp.dtype)
    # Padded positions are zeroed first, so garbage there (even inf/NaN) reaches neither the loss
    # nor its gradient; where() passes a zero gradient to the branch it drops.
    logp = torch.where(active, logp, 0.0)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - torch.where(active, old_logp.detach(), 0.0))
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if beta > 0 and ref_logp is not None:
        per_token_kl = k3_kl(logp, torch.where(active, ref_logp.detach(), 0.0))
        per_token_loss = per_token_loss + beta * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    per_token_loss = per_token_loss * mask
    if algorithm == "grpo":
        loss = (per_token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    else:
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        loss = per_token_loss.sum() / (logp.shape[0] * length)
    # TRL's clip_ratio/region_mean: tokens where min() chose the clipped term (zero gradient)
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    clip_fraction = _masked_mean(is_clipped.to(logp.dtype).detach(), mask)
    return LossOutput(loss=loss, kl=kl, clip_fraction=clip_fraction)
