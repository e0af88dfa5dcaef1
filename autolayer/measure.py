"""Measure one layer subset outside a study: base score, all-layers score, subset score and C.

The search uses the same pieces per trial; this is the direct path for a single candidate, from
Python or `autolayer proxy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autolayer.config import Config
from autolayer.loading import base_reference, load_for, prepare_task
from autolayer.models import find_layer_stack
from autolayer.proxy import ProxyResult, run_proxy
from autolayer.scoring import Contribution, Evaluation, contribution
from autolayer.tasks import Task
from autolayer.tracking import DEFAULT_ROOT


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
    work = load_for(config, prepare_task(config, task))
    num_layers = len(find_layer_stack(work.model))
    base = base_reference(config, work, root)
    full_run = None
    if with_full:
        everything = range(num_layers)
        full_run = run_proxy(work, config.proxy, everything, config.proxy.full_lr, keep=False)
    subset = run_proxy(work, config.proxy, layers, lr, keep=False)
    c = (
        contribution(subset.final, base, full_run.final, seed=config.proxy.seed)
        if full_run
        else None
    )
    return Measurement(
        tuple(sorted(layers)), base, full_run.final if full_run else None, subset, full_run, c
    )
