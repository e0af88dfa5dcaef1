"""Text environments for agents, in the spirit of gymnasium, and the checks that keep them honest.

An environment is any class with

    reset(seed: int) -> str                                   # the first observation
    step(action: str) -> (str, float, bool, dict)             # observation, reward, done, info

Users name theirs in YAML the way they name a reward function (`task.env: pkg.module.Class` or
`path/to/file.py:Class`, with `task.env_kwargs` for its constructor); one instance is made per
trajectory. `reset(seed)` must be deterministic in the seed: the G trajectories of a group start
from the same seed, hence the same state, as GRPO and GiGPO need. A rollout stops at `done` or
after `task.max_turns` actions, whichever comes first.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Protocol

from autolayer.errors import AutolayerError


class TextEnv(Protocol):
    def reset(self, seed: int) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]: ...


EnvFactory = Callable[[], TextEnv]


class EnvError(RuntimeError):
    """An environment raised or broke its contract; the message names its class."""


def env_name(env: Any) -> str:
    return type(env).__name__


def reset(env: TextEnv, seed: int) -> str:
    """`env.reset(seed)`, checked: it must return the observation text."""
    try:
        observation = env.reset(seed)
    except Exception as err:
        raise EnvError(
            f"environment '{env_name(env)}' raised {type(err).__name__} in reset: {err}"
        ) from err
    if not isinstance(observation, str):
        raise EnvError(
            f"environment '{env_name(env)}' reset returned {type(observation).__name__}, "
            "not the observation text"
        )
    return observation


def step(env: TextEnv, action: str) -> tuple[str, float, bool]:
    """`env.step(action)`, checked: (observation text, numeric reward, bool done, dict info)."""
    try:
        result = env.step(action)
    except Exception as err:
        raise EnvError(
            f"environment '{env_name(env)}' raised {type(err).__name__} in step: {err}"
        ) from err
    if not (isinstance(result, tuple) and len(result) == 4):
        raise EnvError(
            f"environment '{env_name(env)}' step returned {type(result).__name__}, not "
            "(observation, reward, done, info)"
        )
    observation, reward, done, info = result
    if not isinstance(observation, str):
        raise EnvError(f"environment '{env_name(env)}' step returned a non-text observation")
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
        raise EnvError(f"environment '{env_name(env)}' step returned the reward {reward!r}")
    if not isinstance(done, bool) or not isinstance(info, dict):
        raise EnvError(f"environment '{env_name(env)}' step needs a bool done and a dict info")
    return observation, float(reward), done


def make(factory: EnvFactory) -> TextEnv:
    try:
        return factory()
    except Exception as err:
        name = getattr(factory, "__name__", str(factory))
        raise EnvError(
            f"environment '{name}' raised {type(err).__name__} when made: {err}"
        ) from err


def check_env(factory: EnvFactory, seed: int = 0) -> None:
    """Make, reset and step one instance before any training: a broken environment is one
    sentence naming its class, in seconds, instead of a failed trial per candidate."""
    try:
        env = make(factory)
        reset(env, seed)
        step(env, "")
    except EnvError as err:
        raise AutolayerError(str(err)) from None
