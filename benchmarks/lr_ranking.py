"""Does the single-layer lr change which layer wins? The same layers at several lrs, at the proxy's
horizon, on the ground truth's training seeds.

    OMP_NUM_THREADS=1 python benchmarks/lr_ranking.py --config examples/smollm2_short.yaml \\
        [--task antonym] [--layers 0,8,16,24,29] [--lrs 3e-4,3e-5,1e-4] [--seeds 100] \\
        [--truth benchmarks/truth/MODEL-TASK.json] [--out benchmarks/truth/MODEL-TASK-lr.json]

Each run trains one layer for `proxy.steps` steps (the horizon a search's trials see) at one lr on
one training seed, scoring the held-out set every `proxy.eval_every` steps, exactly as a long
ground-truth run does (`benchmarks/ground_truth.py`, whose first `proxy.steps` steps at `proxy.lr`
are the same run). Runs go lr by lr in the order given, so a stopped sweep has whole profiles;
each finished run is written at once and a rerun goes on where it stopped. With `--truth`, the
runs at the truth's lr come off its curves instead of running again.

The report: per layer, the score at every lr; per lr, the layer ranking; and the rank agreement
of every two lrs' profiles through `autolayer.compare` (Spearman and Kendall with permutation p and
prompt-bootstrap intervals), which answers whether a search at one lr would pick what it picks at
another.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from ground_truth import TRUTH_SEED, load_truth, long_run, select_layers, write_json  # benchmarks/
from truth_profiles import AGREEMENT_HEADER, agreement_line  # benchmarks/

from autolayer.compare import Profile, agreement
from autolayer.config import load_config
from autolayer.frozen import FrozenStates
from autolayer.loading import load_for, prepare_task
from autolayer.models import find_layer_stack


def key(layer: int, lr: float, seed: int) -> str:
    return f"{layer}@{seed}:lr={lr:g}"


def run_sweep(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = load_config(args.config)
    if args.task:
        config.task.name = args.task
    task = prepare_task(config)
    work = load_for(config, task)
    num_layers = len(find_layer_stack(work.model))
    layers = select_layers(args.layers, num_layers)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    p = config.proxy
    wanted = {
        "model": config.model.name,
        "task": config.task.name,
        "eval_size": config.task.eval_size,
        "steps": p.steps,
        "eval_every": p.eval_every,
        "prompts_per_step": p.prompts_per_step,
        "num_generations": p.num_generations,
        "layers": layers,
        "seeds": seeds,
    }
    sweep = load_truth(out, wanted)  # refuses a file measured with other settings
    sweep["num_layers"] = num_layers
    runs = sweep["runs"]
    states = FrozenStates(config.proxy.frozen_cache_mb)
    if args.truth:
        for k, run in from_truth(json.loads(Path(args.truth).read_text()), wanted).items():
            runs.setdefault(k, run)  # a run measured here stays as measured
    jobs = [(x, lr, s) for lr in lrs for s in seeds for x in layers]
    for i, (layer, lr, seed) in enumerate(jobs):
        if key(layer, lr, seed) in runs:
            continue
        run = long_run(work, config, [layer], lr, seed, config.proxy.steps, states)
        runs[key(layer, lr, seed)] = run
        write_json(out, sweep)
        score = float(np.mean(run["outcomes"]))
        what = f"layer {layer} lr {lr:g} seed {seed}"
        print(f"[{i + 1}/{len(jobs)}] {what}: {score:.3f} in {run['seconds']:.0f} s", flush=True)
    return sweep


def from_truth(truth: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The runs at the truth's lr, read at this sweep's horizon off the truth's long runs: a long
    run's first `steps` steps are the short run on its seed (same prompts, sampling, constant lr;
    the held-out outcomes come out bit-identical)."""
    t = truth["settings"]
    same = ("model", "task", "eval_size", "eval_every", "prompts_per_step", "num_generations")
    lr = t["lr"]
    if any(t[k] != wanted[k] for k in same):
        raise SystemExit("the truth was measured with other settings than this sweep's")
    step = wanted["steps"]
    out = {}
    for seed, layer in itertools.product(wanted["seeds"], wanted["layers"]):
        run = truth["runs"].get(f"{layer}@{seed}")
        if run is None:
            continue
        curve = {k: v for k, v in run["curve"].items() if int(k) <= step}
        kept = {k: v for k, v in run["curve_outcomes"].items() if int(k) <= step}
        out[key(layer, lr, seed)] = {**run, "curve": curve, "curve_outcomes": kept,
                                     "outcomes": run["curve_outcomes"][str(step)],
                                     "seconds": None, "from_truth": True}  # fmt: skip
    return out


def profiles(sweep: dict[str, Any]) -> dict[float, Profile]:
    """Per lr, the layers it has on every seed all the lrs have (so every two profiles pair on
    the same seeds), outcomes averaged over those seeds."""
    found: dict[float, dict[int, dict[int, list[float]]]] = {}  # lr -> seed -> layer -> outcomes
    for run in sweep["runs"].values():
        done = found.setdefault(run["lr"], {}).setdefault(run["seed"], {})
        done[run["layers"][0]] = run["outcomes"]
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in found.values())))
    out = {}
    for lr, by_seed in sorted(found.items()):
        seeds_here = seeds or [min(by_seed)]  # before the lrs share a seed: what each lr has
        kept = sorted(set.intersection(*(set(by_seed.get(s, {})) for s in seeds_here)))
        outcomes = np.array(
            [np.mean([by_seed[s][x] for s in seeds_here], axis=0) for x in kept], dtype=float
        )
        name = f"lr {lr:g} (seeds {','.join(map(str, seeds_here))})"
        out[lr] = Profile(name, sweep["settings"]["model"], tuple(kept), outcomes)
    return out


def restricted(p: Profile, layers: list[int]) -> Profile:
    """`p` on `layers` only, in that order."""
    rows = [p.layers.index(x) for x in layers]
    return Profile(p.study, p.model, tuple(layers), p.outcomes[rows])


def long_profile(truth: dict[str, Any], layers: list[int]) -> Profile:
    """The truth's final outcomes on `layers` (those with every truth seed), seeds averaged."""
    seeds = truth["settings"]["seeds"]
    runs = truth["runs"]
    kept = [x for x in layers if all(f"{x}@{s}" in runs for s in seeds)]
    outcomes = np.array(
        [np.mean([runs[f"{x}@{s}"]["outcomes"] for s in seeds], axis=0) for x in kept]
    )
    t = truth["settings"]
    name = f"long run ({t['steps']} steps, lr {t['lr']:g}, seeds {','.join(map(str, seeds))})"
    return Profile(name, t["model"], tuple(kept), outcomes)


def report(sweep: dict[str, Any], truth: dict[str, Any] | None = None) -> str:
    """The scores and rankings per lr, and every two profiles' rank agreement (and each lr's with
    the truth's long run, when given)."""
    by_lr = profiles(sweep)
    layers = sorted({x for p in by_lr.values() for x in p.layers})
    s = sweep["settings"]
    lines = [
        f"## {Path(s['model']).name}/{s['task']}: one layer, {s['steps']} steps\n",
        "| layer | " + " | ".join(p.study for p in by_lr.values()) + " |",
        "|---|" + "---|" * len(by_lr),
    ]
    for x in layers:
        cells = [
            f"{p.scores[p.layers.index(x)]:.3f}" if x in p.layers else "-" for p in by_lr.values()
        ]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    orders = [
        " > ".join(str(p.layers[i]) for i in np.argsort(-p.scores, kind="stable"))
        for p in by_lr.values()
    ]
    lines.append("| rank, best first | " + " | ".join(orders) + " |")
    lines += ["", *AGREEMENT_HEADER]
    compared = list(by_lr.values())
    if truth is not None:
        compared.append(long_profile(truth, layers))
    for a, b in itertools.combinations(compared, 2):
        shared = [x for x in a.layers if x in b.layers]
        if len(shared) < 3:
            continue
        lines.append(agreement_line(agreement(*(restricted(p, shared) for p in (a, b))), "layer"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/smollm2_short.yaml")
    parser.add_argument("--task", default=None, help="a task name (default: the config's)")
    parser.add_argument("--layers", default="0,8,16,24,29", help="all, every-other, or 0,7,15")
    parser.add_argument("--lrs", default="3e-4,3e-5,1e-4", help="single-layer lrs, run in order")
    parser.add_argument("--seeds", default=str(TRUTH_SEED), help="training seeds (searches: 0..)")
    parser.add_argument("--out", default=None, help="the JSON (default: benchmarks/truth/...-lr)")
    parser.add_argument("--truth", default=None, help="read the runs at its lr off this truth")
    parser.add_argument("--report", action="store_true", help="only report what --out holds")
    args = parser.parse_args()
    if args.out:
        out = Path(args.out)
    else:
        config = load_config(args.config)
        task = args.task or config.task.name
        out = Path(__file__).parent / "truth" / f"{Path(config.model.name).name}-{task}-lr.json"
    sweep = json.loads(out.read_text()) if args.report else run_sweep(args, out)
    truth = json.loads(Path(args.truth).read_text()) if args.truth else None
    print(report(sweep, truth))


if __name__ == "__main__":
    main()
