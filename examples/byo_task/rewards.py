"""Reward functions for the bring-your-own-task example, in TRL's signature.

Each takes the prompts, the completions and every dataset column (here `a`, `op`, `b`, `answer`)
as keyword lists aligned with the completions, and returns one float (or None) per completion.
The same functions work unchanged as `reward_funcs` of TRL's GRPOTrainer.
"""


def exact_answer(prompts, completions, answer, **kwargs):
    """1.0 when the completion is exactly the right number."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def is_a_number(completions, **kwargs):
    """A small shaping bonus for answering with digits only (a format reward)."""
    return [1.0 if c.strip().isdigit() else 0.0 for c in completions]
