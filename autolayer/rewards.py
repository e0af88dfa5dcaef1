"""Reward functions in TRL's signature: their type, finding one by its path, and its identity.

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`
(`autolayer.task_rewards` calls a task's functions and combines their rewards as TRL does).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autolayer.errors import AutolayerError

RewardFunc = Callable[..., Sequence[float | None]]


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """`pkg.module.name`, `pkg.module:name` or `path/to/file.py:name` -> the object it names."""
    path, colon, attr = spec.rpartition(":")
    if colon and path.endswith(".py"):
        module = _import_file(Path(path).expanduser(), spec, what)
        where = path
    else:
        module_name, _, attr = (path, None, attr) if colon else spec.rpartition(".")
        if not module_name or not attr:
            raise AutolayerError(
                f"{what} '{spec}' must be a dotted path (pkg.module.name) or path/to/file.py:name"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise AutolayerError(f"{what} '{spec}': cannot import {module_name} ({err})") from None
        where = module_name
    found = getattr(module, attr, None)
    if found is None or not callable(found):
        raise AutolayerError(f"{what} '{spec}': {where} has no callable '{attr}'")
    return found


def _import_file(path: Path, spec: str, what: str) -> Any:
    if not path.is_file():
        raise AutolayerError(f"{what} '{spec}': the file {path} does not exist")
    name = "autolayer_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise AutolayerError(f"{what} '{spec}': importing {path} raised {err!r}") from None
    return module


def func_name(func: Callable[..., Any]) -> str:
    return str(getattr(func, "__name__", type(func).__name__))


def repeat_rows(batch: dict[str, list[Any]], times: int) -> dict[str, list[Any]]:
    """Each row repeated `times` in place (prompt-major: a a b b), for G samples per prompt."""
    if times < 1:
        raise ValueError(f"times must be at least 1, got {times}")
    return {key: [v for v in values for _ in range(times)] for key, values in batch.items()}


def reward_identity(func: Callable[..., Any]) -> str:
    """Module, name and a hash of the source: an edited reward function gets a new identity."""
    target = getattr(func, "func", func)  # functools.partial
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = repr(target)
    extra = repr((getattr(func, "args", ()), getattr(func, "keywords", {})))
    digest = hashlib.sha256((source + extra).encode()).hexdigest()[:16]
    return f"{getattr(target, '__module__', '?')}.{func_name(target)}@{digest}"
