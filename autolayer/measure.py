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
from autolayer.loading import base_reference, load_for, prepare_task
from autolayer.models import find_layer_stack, layer_param_names, restore, snapshot
from autolayer.proxy import EvalHook, ProxyResult, run_proxy
from autolayer.scoring import Contribution, Evaluation, contribution
from autolayer.tasks import Task
from autolayer.tracking import DEFAULT_ROOT


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
