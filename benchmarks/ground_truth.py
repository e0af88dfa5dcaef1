"""The ground truth of a (model, task): every single layer trained long, on seeds no search uses.

    OMP_NUM_THREADS=1 python benchmarks/ground_truth.py --config examples/smollm2_short.yaml \\
        [--task antonym] [--layers every-other] [--factor 4] [--seeds 100,101] [--lr 1e-4] \\
        [--full-lrs 1e-5,3e-5,1e-4] [--out benchmarks/truth/MODEL-TASK.json]

Each run trains one layer (at `--lr`, default `proxy.lr`) for `--factor` x `proxy.steps` steps
on one training seed (100, 101, ...: the searches use 0, 1, ...) and scores the held-out set
every `proxy.eval_every` steps; its curve keeps, per eval, the step, score, standard error and every
prompt's outcome. The all-layers reference trains as long, at the best of `--full-lrs` (each tried
on the first seed; the best final score wins), then on the other seeds at that lr.

Runs go highest value first: layers in an order that interleaves depths (first, last, middle,
then the quarter points...), each on every seed before the next layer, so a killed or partial
sweep already shows a profile with seed noise; the all-layers lr sweep comes after the first
three layers. Each finished run is written to `--out` at once (atomically); a rerun skips the
runs it holds and goes on. `--layers every-other` (0, 2, 4... and the last) about halves a
sweep that does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from autolayer.baselines import layer_snr
from autolayer.config import Config, load_config
from autolayer.files import write_text_atomic
from autolayer.frozen import FrozenStates
from autolayer.layers import parse_layers
from autolayer.loading import Workload, base_reference, load_for, prepare_task
from autolayer.models import find_layer_stack
from autolayer.proxy import run_proxy
from autolayer.scoring import Evaluation

TRUTH_SEED = 100  # training seeds of the ground truth start here; searches use 0, 1, ...
DEFAULT_ROOT = Path("/tmp/autolayer-truth")  # base-score cache


class Job(NamedTuple):
    """One long run: its key in the JSON, the layers it trains, its lr and training seed."""

    key: str
    layers: list[int]
    lr: float
    seed: int


def long_run(
    work: Workload,
    config: Config,
    layers: list[int],
    lr: float,
    seed: int,
    steps: int,
    states: FrozenStates | None = None,
) -> dict[str, Any]:
    """One long proxy run: its held-out curve (score, stderr and outcomes per eval) and finals.
    `states` keeps the frozen layers' prefills for the runs after it, as a search's does."""
    curve: dict[str, tuple[float, float]] = {}
    outcomes: dict[str, list[float]] = {}

    def hook(step: int, evaluation: Evaluation) -> bool:
        curve[str(step)] = (evaluation.score, evaluation.stderr)
        outcomes[str(step)] = list(evaluation.outcomes)
        return False

    proxy = dataclasses.replace(config.proxy, steps=steps, seed=seed)
    start = time.perf_counter()
    result = run_proxy(work, proxy, layers, lr, keep=False, eval_hook=hook, states=states)
    return {
        "layers": sorted(layers),
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "curve_outcomes": outcomes,
        "outcomes": list(result.final.outcomes),
        "seconds": time.perf_counter() - start,
    }


def interleaved(layers: list[int]) -> list[int]:
    """`layers` with the ends first, then midpoints of ever finer intervals: 0, 29, 15, 7, 22..."""
    if len(layers) <= 2:
        return list(layers)
    order, intervals = [0, len(layers) - 1], [(0, len(layers) - 1)]
    while intervals:
        lo, hi = intervals.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi + 1) // 2
        order.append(mid)
        intervals += [(lo, mid), (mid, hi)]
    return [layers[i] for i in order]


def lr_key(lr: float, seed: int) -> str:
    return f"all@{seed}:lr={lr:g}"


def plan(
    layers: list[int], num_layers: int, seeds: list[int], lr: float, full_lrs: list[float]
) -> list[Job]:
    """Every run of the sweep, highest value first (see the module docstring). The all-layers
    runs after the sweep carry lr 0: their lr is the sweep's pick, known only once it has run."""
    every = list(range(num_layers))
    singles = [Job(f"{x}@{s}", [x], lr, s) for x in interleaved(layers) for s in seeds]
    head = 3 * len(seeds)
    sweep = [Job(lr_key(x, seeds[0]), every, x, seeds[0]) for x in full_lrs]
    rest = [Job(f"all@{s}", every, 0.0, s) for s in seeds[1:]]
    return singles[:head] + sweep + rest + singles[head:]


def best_full_lr(runs: dict[str, Any], full_lrs: list[float], seed: int) -> float:
    """The lr whose all-layers run scored best at the end, on the first seed."""
    return max(full_lrs, key=lambda x: float(np.mean(runs[lr_key(x, seed)]["outcomes"])))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload))


def settings(config: Config, layers: list[int], seeds: list[int], steps: int) -> dict[str, Any]:
    """What a stored truth was measured with; a rerun with other settings is refused."""
    p = config.proxy
    return {
        "model": config.model.name,
        "task": config.task.name,
        "eval_size": config.task.eval_size,
        "steps": steps,
        "proxy_steps": p.steps,
        "eval_every": p.eval_every,
        "prompts_per_step": p.prompts_per_step,
        "num_generations": p.num_generations,
        "lr": p.lr,
        "algorithm": p.algorithm,
        "layers": layers,
        "seeds": seeds,
    }


def load_truth(path: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """The stored truth at `path` (empty when new); one measured otherwise is refused."""
    truth: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    stored = truth.get("settings")
    if stored is not None:
        differ = [k for k in wanted if k not in ("layers", "seeds") and stored.get(k) != wanted[k]]
        if differ:
            raise SystemExit(
                f"{path} was measured with other settings ({', '.join(differ)}: "
                f"{[stored.get(k) for k in differ]}); choose another --out"
            )
    truth["settings"] = {**wanted, **({} if stored is None else _union(stored, wanted))}
    truth.setdefault("runs", {})
    return truth


def _union(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Layers and seeds grow when a rerun asks for more; those already measured stay."""
    return {key: sorted(set(stored[key]) | set(wanted[key])) for key in ("layers", "seeds")}


def run_truth(
    config: Config,
    out: Path,
    *,
    layers: str = "all",
    seeds: list[int],
    factor: int,
    full_lrs: list[float],
    root: Path = DEFAULT_ROOT,
) -> dict[str, Any]:
    """Measure (or finish measuring) the ground truth into `out`; returns it."""
    task = prepare_task(config)
    work = load_for(config, task)
    stack = find_layer_stack(work.model)
    num_layers = len(stack)
    chosen = select_layers(layers, num_layers)
    steps = factor * config.proxy.steps
    truth = load_truth(out, settings(config, chosen, seeds, steps))
    truth.setdefault("base", list(base_reference(config, work, root).outcomes))
    truth["snr"] = layer_snr(list(stack.layers))
    truth["num_layers"], truth["steps"], truth["full_lrs"] = num_layers, steps, full_lrs
    runs = truth["runs"]
    if f"all@{seeds[0]}" in runs and len(full_lrs) == 1:  # stored before the lr sweep existed
        runs.setdefault(lr_key(full_lrs[0], seeds[0]), runs[f"all@{seeds[0]}"])
    jobs = plan(chosen, num_layers, seeds, config.proxy.lr, full_lrs)
    base = float(np.mean(truth["base"]))
    print(f"{out}: {len(jobs)} runs of {steps} steps, base {base:.3f}", flush=True)
    spent = [runs[j.key]["seconds"] for j in jobs if j.key in runs]
    states = FrozenStates(config.proxy.frozen_cache_mb)
    for i, job in enumerate(jobs):
        if job.key in runs:
            continue
        if job.lr == 0.0:  # an all-layers run at the lr the sweep picked
            truth["full_lr"] = best_full_lr(runs, full_lrs, seeds[0])
            job = job._replace(lr=truth["full_lr"])
        runs[job.key] = long_run(work, config, job.layers, job.lr, job.seed, steps, states)
        _alias_full(truth, full_lrs, seeds[0])
        write_json(out, truth)
        spent.append(runs[job.key]["seconds"])
        left = sum(1 for j in jobs[i + 1 :] if j.key not in runs)
        report(i, len(jobs), job, runs[job.key], base, float(np.median(spent)) * left)
    return truth


def _alias_full(truth: dict[str, Any], full_lrs: list[float], seed: int) -> None:
    """Once the lr sweep is whole, its best run is also `all@<first seed>` (what fidelity reads)."""
    runs = truth["runs"]
    if all(lr_key(x, seed) in runs for x in full_lrs):
        truth["full_lr"] = best_full_lr(runs, full_lrs, seed)
        runs[f"all@{seed}"] = runs[lr_key(truth["full_lr"], seed)]


def report(
    i: int, total: int, job: Job, run: dict[str, Any], base: float, left_seconds: float
) -> None:
    final = Evaluation.from_outcomes(run["outcomes"])
    best_step, (best, _) = max(run["curve"].items(), key=lambda kv: kv[1][0])
    what = "all layers" if len(job.layers) > 1 else f"layer {job.layers[0]}"
    print(
        f"[{i + 1}/{total}] {what} seed {job.seed} lr {job.lr:g}: {final.score:.3f} +- "
        f"{final.stderr:.3f} ({final.score - base:+.3f} on base; best {best:.3f} at step "
        f"{best_step}) in {run['seconds']:.0f} s; about {left_seconds / 3600:.1f} h left",
        flush=True,
    )


def select_layers(spec: str, num_layers: int) -> list[int]:
    """`every-other` (0, 2, 4... and the last layer, which the free "last layer" pick needs),
    else autolayer's selections: `all`, `0,7,15`, `3-9`."""
    if spec == "every-other":
        return sorted({*range(0, num_layers, 2), num_layers - 1})
    return list(parse_layers(spec, num_layers))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/smollm2_short.yaml")
    parser.add_argument("--task", default=None, help="a task name (default: the config's)")
    parser.add_argument("--layers", default="all", help="all, every-other, or a list 0,7,15")
    parser.add_argument("--factor", type=int, default=4, help="long runs: factor x proxy.steps")
    parser.add_argument(
        "--lr", type=float, default=None, help="single-layer lr (default: proxy.lr)"
    )
    parser.add_argument("--seeds", default="100,101", help="training seeds (searches use 0, 1..)")
    parser.add_argument("--full-lrs", default=None, help="all-layers lrs to sweep (default: "
                        "proxy.full_lr / 3, x 1, x 3)")  # fmt: skip
    parser.add_argument("--out", default=None, help="the JSON (default: benchmarks/truth/...)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where the base score is cached")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.task:
        config.task.name = args.task
    if args.lr is not None:  # the long runs' lr; a search's proxy lr may differ from it
        config.proxy.lr = args.lr
    seeds = [int(x) for x in args.seeds.split(",")]
    full = config.proxy.full_lr
    swept = [float(x) for x in args.full_lrs.split(",")] if args.full_lrs else []
    full_lrs = swept or [full / 3, full, full * 3]
    name = f"{Path(config.model.name).name}-{config.task.name}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "truth" / name
    run_truth(
        config, out, layers=args.layers, seeds=seeds,
        factor=args.factor, full_lrs=full_lrs, root=Path(args.root),
    )  # fmt: skip


if __name__ == "__main__":
    main()
