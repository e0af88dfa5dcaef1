"""GRPO / Dr. GRPO maths on tiny literal tensors; expected values are worked by hand alongside."""

import math

import pytest
import torch

from autolayer.rl import (
    AgentStep,
    LossOutput,
    completion_mask,
    discounted_returns,
    gigpo_advantages,
    group_advantages,
    k3_kl,
    policy_loss,
    token_logprobs,
    trajectory_advantages,
)

LN = math.log


def close(actual: torch.Tensor, expected: object, atol: float = 1e-5) -> None:
    """Assert `actual` equals the literal `expected` (a number or nested list) to `atol`."""
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0.0
    )


# --- group_advantages --------------------------------------------------------------------------


def test_grpo_advantages_divide_by_the_unbiased_group_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # groups [1, 0] and [0, 1]: means 0.5, 0.5; unbiased std sqrt((0.25 + 0.25) / 1) = 0.707107
    # A = ±0.5 / (0.707107 + 1e-4) = ±0.5 / 0.707207 = ±0.7070068
    close(group_advantages(rewards, 2, "grpo"), [0.7070068, -0.7070068, -0.7070068, 0.7070068])


def test_dr_grpo_advantages_only_subtract_the_group_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # same groups, no std: A = r - 0.5
    close(group_advantages(rewards, 2, "dr_grpo"), [0.5, -0.5, -0.5, 0.5])


def test_groups_are_prompt_major_and_zero_variance_groups_get_zero() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # G=3, prompt-major: groups [1, 2, 3] and [0, 0, 0] (interleaved would be [1, 3, 0], ...).
    # group 1: mean 2, unbiased var (1 + 0 + 1) / 2 = 1, std 1 -> A = ±1 / 1.0001 = ±0.9999
    # group 2: std 0 -> 0 / (0 + 1e-4) = 0, not NaN
    grpo = group_advantages(rewards, 3, "grpo")
    close(grpo, [-0.9999, 0.0, 0.9999, 0.0, 0.0, 0.0])
    assert not grpo.isnan().any()
    close(group_advantages(rewards, 3, "dr_grpo"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("rewards", "num_generations", "algorithm", "message"),
    [
        (torch.zeros(5), 2, "grpo", "not a multiple"),
        (torch.zeros(4), 1, "grpo", "at least 2"),
        (torch.zeros(4), 2, "ppo", "Unknown algorithm"),
        (torch.zeros(2, 2), 2, "grpo", "1-D"),
    ],
)
def test_group_advantages_rejects_bad_input(
    rewards: torch.Tensor, num_generations: int, algorithm: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, num_generations, algorithm)  # type: ignore[arg-type]


# --- completion_mask ---------------------------------------------------------------------------


def test_completion_mask_keeps_the_first_eos_and_masks_after_it() -> None:
    ids = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1: keep 0..1, the later EOS and 7 are masked
            [5, 6, 7, 8],  # no EOS (truncated): all ones
            [2, 9, 9, 9],  # EOS first: only it counts
        ]
    )
    mask = completion_mask(ids, eos_token_id=2)
    assert mask.dtype == torch.float32
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_completion_mask_accepts_several_eos_ids() -> None:
    ids = torch.tensor([[5, 3, 2, 7]])  # 3 is the first of the EOS ids {2, 3}
    close(completion_mask(ids, eos_token_id=[2, 3]), [[1, 1, 0, 0]])


def test_completion_mask_masks_pad_but_not_an_eos_that_shares_its_id() -> None:
    # right-padded without an EOS: the pads go
    close(
        completion_mask(torch.tensor([[5, 7, 0, 0]]), eos_token_id=2, pad_token_id=0),
        [[1, 1, 0, 0]],
    )
    # pad id == EOS id (common): the first one is the EOS and stays
    close(
        completion_mask(torch.tensor([[5, 2, 2, 2]]), eos_token_id=2, pad_token_id=2),
        [[1, 1, 0, 0]],
    )


# --- token_logprobs ----------------------------------------------------------------------------


def test_token_logprobs_hand_value_and_temperature() -> None:
    logits = torch.tensor([[[0.0, LN(3.0)]]])  # one position, vocab 2
    target = torch.tensor([[1]])
    # softmax([0, ln 3]) = [1/4, 3/4] -> log(3/4) = -0.2876821
    close(token_logprobs(logits, target), [[-0.2876821]])
    # T=2: softmax([0, ln 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3) -> log(1.7320508 / 2.7320508)
    # = log(0.6339746) = -0.4557464
    close(token_logprobs(logits, target, temperature=2.0), [[-0.4557464]])


def test_token_logprobs_matches_direct_log_softmax_gather() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator)
    target = torch.randint(0, 7, (2, 3), generator=generator)
    expected = (logits / 0.7).log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, target, temperature=0.7), expected)


def test_token_logprobs_upcasts_bf16_logits() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))
    target = torch.zeros(2, 3, dtype=torch.long)
    out = token_logprobs(logits.to(torch.bfloat16), target)
    assert out.dtype == torch.float32
    expected = logits.to(torch.bfloat16).float().log_softmax(-1)[..., 0]
    torch.testing.assert_close(out, expected)


def test_token_logprobs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


# --- k3_kl -------------------------------------------------------------------------------------


def test_k3_is_zero_at_equal_logprobs_and_positive_otherwise() -> None:
    logp = torch.tensor([LN(0.5), LN(0.5), LN(0.5)])
    ref = torch.tensor([LN(0.5), LN(0.25), LN(1.0)])
    # q - p = 0                -> 1 - 0 - 1 = 0
    # q - p = ln 0.5 = -0.6931 -> 0.5 + 0.6931 - 1 = 0.1931472
    # q - p = ln 2   = +0.6931 -> 2 - 0.6931 - 1 = 0.3068528
    close(k3_kl(logp, ref), [0.0, 0.1931472, 0.3068528])


# --- policy_loss -------------------------------------------------------------------------------

# Two sequences of different length at rho = 1 (logp == old_logp): 3 active tokens with A = +1,
# 1 active token with A = -2. Each active token's loss is -A.
LOGP = [[-0.5, -1.0, -2.0], [-0.3, -9.0, -9.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])


def test_grpo_averages_per_sequence_then_over_the_batch() -> None:
    logp = torch.tensor(LOGP, requires_grad=True)
    old_logp = torch.tensor(LOGP, requires_grad=True)  # a leaf, so we can see it gets no grad
    out = policy_loss(logp, old_logp, ADV, MASK, "grpo")
    # sequence means: -1 (3 tokens), +2 (1 token); batch mean (-1 + 2) / 2 = 0.5 = -mean(A).
    # (a flat token mean would give (-3 + 2) / 4 = -0.25)
    close(out.loss, 0.5)
    out.loss.backward()
    # d loss / d logp = -A * rho / (len_i * N): -1 / (3 * 2) = -1/6 on row 0; 2 / (1 * 2) = 1
    assert logp.grad is not None
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]])
    assert old_logp.grad is None
    close(out.kl, 0.0)
    close(out.clip_fraction, 0.0)


def test_dr_grpo_sums_tokens_over_a_constant() -> None:
    logp = torch.tensor(LOGP, requires_grad=True)
    out = policy_loss(logp, logp.detach(), ADV, MASK, "dr_grpo")
    # token sum 3 * (-1) + 1 * (+2) = -1; / (N * Lmax) = -1 / (2 * 3) = -0.1666667
    close(out.loss, -1 / 6)
    out.loss.backward()
    # every active token weighs the same: -A / (N * Lmax) = -1/6 and +2/6
    assert logp.grad is not None
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [1 / 3, 0.0, 0.0]])
    # an explicit max_completion_length: -1 / (2 * 4) = -0.125
    out4 = policy_loss(logp, logp.detach(), ADV, MASK, "dr_grpo", max_completion_length=4)
    close(out4.loss, -0.125)


def test_clipping_follows_the_sign_of_the_advantage() -> None:
    old_logp = torch.zeros(3, 2)
    logp = torch.tensor([[LN(1.5), LN(1.5)], [LN(1.5), 0.0], [LN(0.5), 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0, -1.0])
    out = policy_loss(logp, old_logp, adv, mask, "grpo", epsilon=0.2)
    # row 0: rho 1.5, A +1: min(1.5, 1.2) = 1.2 (clipped) -> -1.2; token 1 masked
    # row 1: rho 1.5, A -1: min(-1.5, -1.2) = -1.5 (unclipped) -> 1.5; rho 1 -> 1; mean 1.25
    # row 2: rho 0.5, A -1: min(-0.5, -0.8) = -0.8 (clipped) -> 0.8; rho 1 -> 1; mean 0.9
    # loss (-1.2 + 1.25 + 0.9) / 3 = 0.3166667
    close(out.loss, 0.95 / 3)
    # clipped: 2 of 5 active tokens (the masked rho 1.5 token would have made it 3 of 6)
    close(out.clip_fraction, 0.4)
    out.loss.backward()
    # clipped tokens get no gradient; unclipped: -A * rho / (len * N) = 1.5 / 6, 1 / 6, 1 / 6
    assert logp.grad is not None
    close(logp.grad, [[0.0, 0.0], [0.25, 1 / 6], [0.0, 1 / 6]])


def test_kl_penalty_adds_beta_times_k3() -> None:
    logp = torch.tensor([[LN(0.5), LN(0.5)]])
    ref_logp = torch.tensor([[LN(0.25), LN(1.0)]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    out = policy_loss(logp, logp, adv, mask, "grpo", beta=0.1, ref_logp=ref_logp)
    # k3 per token 0.1931472 and 0.3068528 (see the k3 test): mean (0.5 + ln2 - 1 + 2 - ln2 - 1)
    # / 2 = 0.25 exactly. Loss -(1 - 0.1 * k3) per token, mean = -1 + 0.1 * 0.25 = -0.975
    close(out.loss, -0.975)
    close(out.kl, 0.25)
    # beta 0: no penalty, kl reported as 0 even though a reference is given
    plain = policy_loss(logp, logp, adv, mask, "grpo", beta=0.0, ref_logp=ref_logp)
    close(plain.loss, -1.0)
    close(plain.kl, 0.0)


def test_empty_sequences_and_padding_garbage_do_not_produce_nan() -> None:
    logp = torch.tensor([[-1.0, float("nan")], [float("nan"), float("nan")]], requires_grad=True)
    old_logp = torch.tensor([[-1.0, float("-inf")], [float("-inf"), 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # row 1 has no active token
    out = policy_loss(logp, old_logp, torch.tensor([1.0, 5.0]), mask, "grpo")
    # row means: -1 and 0 (denominator clamped to 1); batch mean -0.5
    close(out.loss, -0.5)
    out.loss.backward()
    assert logp.grad is not None
    close(logp.grad, [[-0.5, 0.0], [0.0, 0.0]])


def test_loss_output_is_a_frozen_record() -> None:
    out = policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), "grpo")
    assert isinstance(out, LossOutput)
    with pytest.raises(AttributeError):
        out.loss = torch.tensor(0.0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "ppo"}, "Unknown algorithm"),
        ({"beta": 0.1}, "ref_logp"),
        ({"beta": -0.1}, "beta must be"),
        ({"max_completion_length": 2}, "shorter than"),
        ({"advantages": torch.ones(3)}, "advantages must be"),
        ({"mask": torch.ones(2, 2)}, "share one"),
        ({"ref_logp": torch.zeros(2, 2), "beta": 0.1}, "ref_logp must be"),
    ],
)
def test_policy_loss_rejects_bad_input(kwargs: dict, message: str) -> None:
    args: dict = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.ones(2),
        "mask": torch.ones(2, 3),
        "algorithm": "grpo",
    }
    with pytest.raises(ValueError, match=message):
        policy_loss(**(args | kwargs))


# --- multi-turn: trajectories and GiGPO (arXiv 2505.10978) -------------------------------------


def steps_of(*trajectories: tuple[int, list[tuple[str, float]]]) -> list[AgentStep]:
    """(group, [(anchor, reward), ...]) per trajectory -> the flat list of loss rows."""
    return [
        AgentStep(group, t, anchor, reward)
        for t, (group, turns) in enumerate(trajectories)
        for anchor, reward in turns
    ]


def test_discounted_returns_by_hand() -> None:
    # R2 = 2; R1 = 0 + 0.5 * 2 = 1; R0 = 1 + 0.5 * 1 = 1.5
    assert discounted_returns([1.0, 0.0, 2.0], 0.5) == [1.5, 1.0, 2.0]
    assert discounted_returns([], 0.9) == []


def test_gigpo_singleton_step_groups_leave_only_the_episode_advantage() -> None:
    # returns 1 and 0: mean 0.5, so A_E = +0.5 / -0.5; every anchor is unique: A_S = 0
    steps = steps_of((0, [("A", 0.0), ("B", 1.0)]), (0, [("C", 0.0)]))
    close(gigpo_advantages(steps, gamma=0.5, omega=1.0), [0.5, 0.5, -0.5])


def test_gigpo_shared_anchor_adds_the_step_advantage() -> None:
    # traj 0: S then X, reward at the end: R = [0.5, 1]; traj 1: S, Y, Z, no reward: R = 0
    # step group S = {0.5, 0}: mean 0.25, A_S = +0.25 / -0.25; the rest are singletons
    # A = A_E + omega A_S with A_E = +0.5 / -0.5
    steps = steps_of((0, [("S", 0.0), ("X", 1.0)]), (0, [("S", 0.0), ("Y", 0.0), ("Z", 0.0)]))
    close(gigpo_advantages(steps, gamma=0.5, omega=1.0), [0.75, 0.5, -0.75, -0.5, -0.5])
    close(gigpo_advantages(steps, gamma=0.5, omega=2.0), [1.0, 0.5, -1.0, -0.5, -0.5])


def test_gigpo_groups_repeated_states_within_one_trajectory() -> None:
    # traj 0 bumps a wall and sees S twice: R = [0.5, 1]; traj 1 sees S once: R = [0]
    # step group S = {0.5, 1, 0}: mean 0.5, A_S = [0, 0.5, -0.5]; A_E = +0.5 / -0.5
    steps = steps_of((0, [("S", 0.0), ("S", 1.0)]), (0, [("S", 0.0)]))
    close(gigpo_advantages(steps, gamma=0.5, omega=1.0), [0.5, 1.0, -1.0])


def test_gigpo_all_equal_returns_give_zero_advantages() -> None:
    steps = steps_of((0, [("S", 0.0), ("T", 1.0)]), (0, [("S", 0.0), ("T", 1.0)]))
    close(gigpo_advantages(steps, gamma=0.9, omega=1.0), [0.0] * 4)
    close(gigpo_advantages(steps, gamma=0.9, omega=1.0, std_norm=True), [0.0] * 4)


def test_gigpo_never_mixes_episode_groups() -> None:
    # the same anchor text in two groups (different initial states) forms two step groups
    steps = steps_of((0, [("S", 1.0)]), (0, [("S", 0.0)]), (1, [("S", 0.0)]), (1, [("S", 0.0)]))
    close(gigpo_advantages(steps, gamma=1.0, omega=1.0), [1.0, -1.0, 0.0, 0.0])


def test_trajectory_advantages_give_every_step_its_episode_advantage() -> None:
    steps = steps_of((0, [("A", 0.0), ("B", 1.0)]), (0, [("C", 0.0)]))
    close(trajectory_advantages(steps, "dr_grpo"), [0.5, 0.5, -0.5])
    # grpo: / (unbiased std of {1, 0} = 0.70711 + 1e-4)
    close(trajectory_advantages(steps, "grpo"), [0.70700, 0.70700, -0.70700], atol=1e-4)
