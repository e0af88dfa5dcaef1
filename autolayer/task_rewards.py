"""A task's reward functions applied: TRL's weighted sum, and the check before any training.

A reward function (`autolayer.rewards`) gets every dataset column other than `prompt` as a list
aligned with `completions`, plus TRL's `trainer_state`, `log_extra` and `log_metric`; `None` means
"not applicable". Several combine as TRL combines them: a weighted sum that skips `None`. So a
function written for TRL's GRPOTrainer works here unchanged, and the other way round.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

from autolayer.envs import check_env
from autolayer.errors import AutolayerError
from autolayer.rewards import RewardFunc, func_name, is_messages, repeat_rows
from autolayer.tasks import Task

CHECK_ROWS = 2  # held-out rows each reward function is tried on before any training


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


# The keyword arguments TRL's GRPOTrainer adds to every reward call, so a function that runs here
# also runs under TRL (which requires **kwargs or these names); there is no trainer state here.
TRL_EXTRAS: dict[str, Any] = {"trainer_state": None, "log_extra": _ignore, "log_metric": _ignore}


class RewardError(RuntimeError):
    """A reward function raised or returned a wrong value; the message names it."""


def score_completions(
    task: Task,
    prompts: list[Any],
    completions: list[str],
    rows: dict[str, list[Any]],
    completion_ids: list[list[int]] | None = None,
) -> list[float]:
    """Per-completion weighted sum of the task's rewards, as TRL combines reward functions.

    `rows` maps each non-prompt column to a list aligned with `completions`. A reward of `None`
    (or NaN) means "not applicable" and adds 0, as TRL's nansum does. With chat-message prompts
    the completions reach the functions as `[{"role": "assistant", "content": text}]`, as TRL
    passes them.
    """
    weights = task.reward_weights or (1.0,) * len(task.reward_funcs)
    totals = [0.0] * len(completions)
    for weight, values in zip(
        weights, reward_values(task, prompts, completions, rows, completion_ids), strict=True
    ):
        totals = [t + weight * (v or 0.0) for t, v in zip(totals, values, strict=True)]
    return totals


def reward_values(
    task: Task,
    prompts: list[Any],
    completions: list[str],
    rows: dict[str, list[Any]],
    completion_ids: list[list[int]] | None = None,
) -> list[list[float | None]]:
    """Each reward function's checked rewards, in order; None where it does not apply."""
    for column, values in rows.items():
        if len(values) != len(completions):
            raise ValueError(
                f"column '{column}' has {len(values)} values for {len(completions)} completions"
            )
    chat = bool(prompts) and is_messages(prompts[0])
    given: list[Any] = (
        [[{"role": "assistant", "content": c}] for c in completions] if chat else completions
    )
    ids = completion_ids if completion_ids is not None else [[] for _ in completions]
    out = []
    for func in task.reward_funcs:
        try:
            rewards = func(
                prompts=prompts, completions=given, completion_ids=ids, **TRL_EXTRAS, **rows
            )
        except Exception as err:
            raise RewardError(
                f"reward function '{func_name(func)}' raised {type(err).__name__}: {err}"
            ) from err
        out.append(_checked(func, rewards, len(completions)))
    return out


def _checked(func: RewardFunc, rewards: Any, n: int) -> list[float | None]:
    """Rewards as floats (None and NaN as None: not applicable); a wrong length or type, or an
    infinite reward (no advantage or mean survives one), names the function."""
    name = func_name(func)
    listlike = hasattr(rewards, "__len__") and hasattr(rewards, "__iter__")
    if isinstance(rewards, (str, bytes)) or not listlike:
        raise RewardError(
            f"reward function '{name}' returned {type(rewards).__name__}, not a list of {n} numbers"
        )
    if len(rewards) != n:
        raise RewardError(
            f"reward function '{name}' returned {len(rewards)} rewards for {n} completions"
        )
    out: list[float | None] = []
    for value in rewards:
        if value is None:
            out.append(None)
        elif isinstance(value, numbers.Real):
            if math.isinf(float(value)):
                raise RewardError(
                    f"reward function '{name}' returned {float(value)}; rewards must be finite "
                    "numbers, or None (or NaN) for not applicable"
                )
            out.append(None if math.isnan(float(value)) else float(value))
        else:
            raise RewardError(
                f"reward function '{name}' returned {value!r} ({type(value).__name__}); rewards "
                "must be numbers or None"
            )
    return out


def check_rewards(task: Task) -> None:
    """Try every reward function on a few held-out rows before any training.

    A function that does not take TRL's signature, raises, or returns the wrong length or type
    or an infinite reward stops here with one sentence that names it, instead of failing every
    trial later; so do functions that give no number (only None or NaN) on any row tried, which
    would score every run 0 and name a best among equals. An environment task's environment is
    made, reset and stepped instead.
    """
    if task.env is not None:
        check_env(task.env)
        return
    rows = task.eval.select(range(min(CHECK_ROWS, len(task.eval)))).to_dict()
    prompts = repeat_rows(rows, 2)["prompt"]
    columns = {k: v for k, v in repeat_rows(rows, 2).items() if k != "prompt"}
    completions = ["", "0"] * len(rows["prompt"])  # an empty answer and a short wrong one
    for func in task.reward_funcs:
        try:
            inspect.signature(func).bind(
                prompts=prompts, completions=completions, completion_ids=[], **TRL_EXTRAS, **columns
            )
        except TypeError as err:
            raise AutolayerError(
                f"reward function '{func_name(func)}' does not take TRL's reward signature "
                f"f(prompts, completions, **kwargs) for the columns {', '.join(columns)}: {err}"
            ) from None
        except ValueError:
            pass  # a builtin without an inspectable signature: the call below checks it
    try:
        values = reward_values(task, prompts, completions, columns)
    except RewardError as err:
        raise AutolayerError(f"{err} (checked on {len(prompts)} held-out rows)") from None
    if all(v is None for per_func in values for v in per_func):
        names = ", ".join(f"'{func_name(f)}'" for f in task.reward_funcs)
        raise AutolayerError(
            f"the reward functions ({names}) returned None or NaN for all {len(completions)} "
            f"completions tried on {len(rows['prompt'])} held-out rows, so no score can be "
            "measured; return a number wherever a reward applies"
        )
