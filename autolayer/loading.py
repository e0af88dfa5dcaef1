"""What every run starts from: the task (its rewards tried on real rows), the model on the proxy's
device with its tokenizer, and the base model's held-out score (cached on disk).

Nothing here imports Lightning: the search, `autolayer train` (TRL) and the benchmarks share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from autolayer.config import Config
from autolayer.errors import AutolayerError
from autolayer.models import load_model, set_threads
from autolayer.scoring import Evaluation, ScoreCache, eval_fingerprint, evaluate
from autolayer.task_rewards import RewardError, check_rewards
from autolayer.tasks import Task, for_tokenizer, load_task


def prepare_task(config: Config, task: Task | None = None) -> Task:
    """`task`, or the one `config.task` describes, with its reward functions tried on real rows.

    Runs before the model loads, so bad data or a broken reward fails in seconds.
    """
    task = task if task is not None else load_task(config.task)
    if config.proxy.algorithm == "gigpo" and task.env is None:
        raise AutolayerError(
            "proxy.algorithm gigpo needs a multi-turn environment task (task.env); use grpo or "
            "dr_grpo for single-turn tasks"
        )
    check_rewards(task)
    return task


class Workload(NamedTuple):
    """What a run works on: the model (trained in place), its tokenizer and the task bound to it.

    One value instead of three parameters, so the proxy run, the measurement and the references
    take the same thing; it unpacks as `model, tokenizer, task = work`.
    """

    model: nn.Module
    tokenizer: Any
    task: Task


def load_for(config: Config, task: Task | None = None) -> Workload:
    """The model (on the proxy's device), its tokenizer and the task bound to that tokenizer.

    `task` is one `prepare_task` returned; without it, `config.task` is loaded and checked first.
    """
    task = task if task is not None else prepare_task(config)
    set_threads(config.proxy.threads)
    model, tokenizer = load_model(
        config.model.name,
        revision=config.model.revision,
        dtype=config.model.dtype,
        device=config.proxy.device,
    )
    return Workload(model, tokenizer, for_tokenizer(task, tokenizer))


def base_reference(config: Config, work: Workload, root: Path) -> Evaluation:
    """The base model's held-out outcomes, cached on disk per (model, task, eval set)."""
    model, tokenizer, task = work
    cache = ScoreCache(root / "cache")
    key = "base-" + eval_fingerprint(
        config.model.name, config.model.revision, model, tokenizer, task
    )
    cached = cache.get(key)
    if cached is not None and len(cached.outcomes) == len(task.eval):
        return cached
    try:
        evaluation = evaluate(model, tokenizer, task)
    except RewardError as err:  # one the check on a few rows did not meet (an inf, a raise)
        raise AutolayerError(f"scoring the base model failed: {err}") from err
    cache.put(key, evaluation)
    return evaluation
