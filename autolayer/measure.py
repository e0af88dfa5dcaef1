"""Measure one layer subset outside a study: base score, all-layers score, subset score and C.

The search uses the same pieces per trial; this is the direct path for a single candidate, from
Python or `autolayer proxy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autolayer.config import Config, ProxyConfig
from autolayer.errors import AutolayerError
from autolayer.models import (
    find_layer_stack,
    layer_param_names,
    load_model,
    restore,
    set_threads,
    snapshot,
)
from autolayer.proxy import EvalHook, ProxyResult, run_proxy
from autolayer.rewards import check_rewards
from autolayer.scoring import (
    Contribution,
    Evaluation,
    ScoreCache,
    contribution,
    eval_fingerprint,
    evaluate,
)
from autolayer.tasks import Task, for_tokenizer, load_task
from autolayer.tracking import DEFAULT_ROOT


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


def load_for(config: Config, task: Task | None = None) -> tuple[nn.Module, Any, Task]:
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
    return model, tokenizer, for_tokenizer(task, tokenizer)


def base_reference(
    config: Config, model: nn.Module, tokenizer: Any, task: Task, root: Path
) -> Evaluation:
    """The base model's held-out outcomes, cached on disk per (model, task, eval set)."""
    cache = ScoreCache(root / "cache")
    key = "base-" + eval_fingerprint(
        config.model.name, config.model.revision, model, tokenizer, task
    )
    cached = cache.get(key)
    if cached is not None and len(cached.outcomes) == len(task.eval):
        return cached
    evaluation = evaluate(model, tokenizer, task)
    cache.put(key, evaluation)
    return evaluation


def proxy_and_restore(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    config: ProxyConfig,
    layers: Sequence[int],
    lr: float,
    *,
    eval_hook: EvalHook | None = None,
    logger: Any = None,
) -> ProxyResult:
    """One proxy run that trains `model` in place, then puts the trained layers' values back."""
    saved = snapshot(model, layer_param_names(model, layers))
    try:
        return run_proxy(
            model, tokenizer, task, config, layers, lr, eval_hook=eval_hook, logger=logger
        )
    finally:
        restore(model, saved)


@dataclass(frozen=True)
class Measurement:
    layers: tuple[int, ...]
    base: Evaluation
    full: Evaluation | None
    subset: ProxyResult
    full_run: ProxyResult | None
    contribution: Contribution | None


def measure(
    config: Config,
    layers: Sequence[int],
    lr: float | None = None,
    *,
    with_full: bool = True,
    root: Path = DEFAULT_ROOT,
    task: Task | None = None,
) -> Measurement:
    """Train `layers` for one proxy run and report it against the base and the all-layers run.

    `task` replaces the one `config.task` describes (the Python way to bring your own task).
    """
    model, tokenizer, task = load_for(config, prepare_task(config, task))
    num_layers = len(find_layer_stack(model))
    base = base_reference(config, model, tokenizer, task, root)
    full_run = None
    if with_full:
        full_run = proxy_and_restore(
            model, tokenizer, task, config.proxy, range(num_layers), config.proxy.full_lr
        )
    subset = proxy_and_restore(
        model, tokenizer, task, config.proxy, layers, config.proxy.lr if lr is None else lr
    )
    c = (
        contribution(subset.final, base, full_run.final, seed=config.proxy.seed)
        if full_run
        else None
    )
    return Measurement(
        tuple(sorted(layers)), base, full_run.final if full_run else None, subset, full_run, c
    )
