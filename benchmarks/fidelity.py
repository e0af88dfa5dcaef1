"""Does the search find the layer that long RL runs say is best, and does it beat the free picks?

    python benchmarks/fidelity.py --config examples/organism.yaml [--factor 5] [--seeds 3]

Ground truth: every single layer, and all layers, trained for `factor` x the proxy horizon on
`--seeds` training seeds (seeds 100, 101, ...: none shared with the searches), scored on the
held-out set every `proxy.eval_every` steps. Their final outcomes give the long-run estimate of
every layer (`autolayer.estimate`: mean over seeds, intervals over seeds and prompts) and the
long-run top set: the best layer and every layer statistically tied with it.

Then the real search (`autolayer.runner.run_search`, the config's sampler, pruner, racing and
baselines, tracking off) runs once per search seed 0, 1, ... (`--search-seeds`), and the report
gives, per run: the pick and its tied set against the long-run top set, Spearman and Kendall of
the search's layer ranking against the long-run means, and its cost in proxy steps and seconds
against the long exhaustive sweep. The free heuristics (middle, last, Spectrum, random) are read
off the same ground truth.

Mis-prunes: both pruners (median, interval) are replayed on the ground-truth curves cut at the
proxy horizon, one replay per ground-truth seed, through Optuna's own pruners via ask/tell; a
mis-prune is a pruned layer in the long-run top set.

The ground truth is measured by `benchmarks/ground_truth.py` (its curves keep every eval's
per-prompt outcomes) and cached in `--cache` (JSON, one entry per run), so a killed run resumes.
`--truth FILE` reads a stored one instead (a real model's, `benchmarks/truth/*.json`), finished or
not: only the layers measured on every truth seed count, and a pick or heuristic outside them shows
as unmeasured. `--space` searches another space (`every_other_layer` against an every-other-layer
truth). Each finished search is kept in `--searches` (JSON, one entry per search seed; Optuna's own
storage under `--root` resumes a search killed midway), so the report can be rerun as the truth
fills in without searching again:

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py --config examples/smollm2_short.yaml \
        --truth benchmarks/truth/smollm2-135m-instruct-antonym.json --space every_other_layer \
        --searches benchmarks/truth/smollm2-135m-instruct-antonym-searches.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ground_truth import TRUTH_SEED, run_truth, settings, write_json  # benchmarks/ground_truth.py
from scipy import stats

from autolayer.baselines import picks
from autolayer.config import Config, load_config
from autolayer.estimate import analyse
from autolayer.runner import run_search
from autolayer.samplers import make_pruner
from autolayer.search import steps_used
from autolayer.spaces import Space, bind, load_space, warm_start_params
from autolayer.study import measured, study_analysis, write_study, write_trial


def ground_truth(config: Config, factor: int, seeds: int, cache: Path) -> dict[str, Any]:
    """Every layer and all layers (at `proxy.full_lr`), long, on `seeds` truth seeds (resumable)."""
    return run_truth(
        config, cache, seeds=list(range(TRUTH_SEED, TRUTH_SEED + seeds)), factor=factor,
        full_lrs=[config.proxy.full_lr], root=cache.parent,
    )  # fmt: skip


def truth_seeds(truth: dict[str, Any]) -> list[int]:
    return list(truth["settings"]["seeds"])


def measured_layers(truth: dict[str, Any]) -> list[int]:
    """The single layers the truth has on every one of its seeds."""
    runs = truth["runs"]
    return [
        x for x in range(truth["num_layers"]) if all(f"{x}@{s}" in runs for s in truth_seeds(truth))
    ]


def truth_analysis(truth: dict[str, Any]) -> Any:
    runs = truth["runs"]
    by_layer = {
        layer: np.array([runs[f"{layer}@{s}"]["outcomes"] for s in truth_seeds(truth)])
        for layer in measured_layers(truth)
    }
    full_seeds = [s for s in truth_seeds(truth) if f"all@{s}" in runs]
    full = np.array([runs[f"all@{s}"]["outcomes"] for s in full_seeds]) if full_seeds else None
    return analyse(by_layer, np.asarray(truth["base"], dtype=float), full), by_layer


def replay_pruner(
    name: str, truth: dict[str, Any], seed: int, horizon: int, eval_every: int, order: list[int]
) -> list[int]:
    """The layers a pruner stops when the trials follow the ground truth's curves (one seed)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = float(np.mean(truth["base"]))
    study = optuna.create_study(
        direction="maximize",
        pruner=make_pruner(name, n_warmup_steps=eval_every, final_step=horizon),
    )
    write_study(study, objective_origin=base)
    pruned = []
    for layer in order:
        curve = {int(k): v for k, v in truth["runs"][f"{layer}@{seed}"]["curve"].items()}
        trial = study.ask()
        stopped = False
        for step in range(eval_every, horizon, eval_every):
            score, se = curve[step]
            write_trial(trial, objective_se=se)
            trial.report(score, step)
            if trial.should_prune():
                stopped = True
                break
        if stopped:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned.append(layer)
        else:
            score, se = curve[horizon]
            write_trial(trial, objective_se=se)
            study.tell(trial, score)
    return pruned


def search_once(config: Config, seed: int, root: Path, space: str) -> dict[str, Any]:
    config = dataclasses.replace(
        config,
        search=dataclasses.replace(
            config.search, seed=seed, study_name=f"fidelity-{space}-{seed}", space=space
        ),
        proxy=dataclasses.replace(config.proxy, seed=seed),
        tracking=dataclasses.replace(config.tracking, enabled=False),
    )
    start = time.perf_counter()
    ctx = run_search(config, root)
    seconds = time.perf_counter() - start
    analysis = study_analysis(ctx.study)
    assert analysis is not None and analysis.best is not None
    scores = {key[0][0]: e.score for key, e in analysis.estimates.items()}
    for trial in ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)):
        layers = trial.user_attrs.get("layers")
        if layers and layers[0] not in scores and trial.intermediate_values:
            # a pruned layer ranks by its last held-out score, below what it would have reached
            last = trial.intermediate_values[max(trial.intermediate_values)]
            scores[layers[0]] = (
                ctx.refs.base.score + last * (ctx.refs.full.score - ctx.refs.base.score)
                if ctx.study.user_attrs.get("objective") == "contribution C"
                else last
            )
    return {
        "pick": analysis.best[0][0],
        "tied": sorted(key[0][0] for key in analysis.tied),
        "scores": scores,
        "steps": steps_used(ctx.study) + config.proxy.steps,  # + the all-layers reference
        "seconds": seconds,
        "runs": sum(len(v) for v in measured(ctx.study).values()),
        "baselines": ctx.study.user_attrs.get("baselines", {}),
    }


def summarise_truth(truth: dict[str, Any], eligible: list[int]) -> tuple[Any, dict[str, Any]]:
    """The long-run estimates over the measured layers; the exhaustive sweep's cost is that of
    every layer the search may pick on every truth seed (the measured runs' mean time each)."""
    long, _ = truth_analysis(truth)
    layers = measured_layers(truth)
    mean = {layer: long.estimates[layer].score for layer in layers}
    runs = truth["runs"]
    seeds = truth_seeds(truth)
    full_seeds = [s for s in seeds if f"all@{s}" in runs]
    seconds = [runs[f"{x}@{s}"]["seconds"] for x in layers for s in seeds]
    return long, {
        "steps": truth["steps"],
        "lr": truth["settings"]["lr"],
        "seeds": len(seeds),
        "eligible": eligible,
        "unmeasured": [x for x in eligible if x not in layers],
        "mean_score": mean,
        "C": {layer: long.estimates[layer].contribution for layer in layers},
        "C_interval": {
            layer: (long.estimates[layer].low, long.estimates[layer].high) for layer in layers
        },
        "best": long.best,
        "top_set": sorted(long.tied),
        "seed_sd": long.seed_sd,
        "spearman_depth": float(stats.spearmanr(layers, [mean[x] for x in layers]).statistic),
        "full_score": (
            float(np.mean([np.mean(runs[f"all@{s}"]["outcomes"]) for s in full_seeds]))
            if full_seeds
            else None
        ),
        "sweep_steps": len(eligible) * len(seeds) * truth["steps"],
        "sweep_seconds": float(np.mean(seconds)) * len(eligible) * len(seeds),
    }


def free_heuristics(truth: dict[str, Any], t: dict[str, Any], space: Space) -> dict[str, Any]:
    """The free picks on the whole stack (what a user gets without a search: the middle layer,
    the last, Spectrum's highest SNR), read off the truth; random is its expectation over the
    search's grid (unmeasured while part of the grid is)."""
    last = truth["num_layers"] - 1
    chosen = picks("single_layer", (0, last), 1, truth["snr"], seed=0)
    out = {
        name: {
            "layer": pick[0],
            "C": t["C"].get(pick[0]),
            "regret": regret(t, pick[0]),
            "in_top_set": pick[0] in t["top_set"] if pick[0] in t["C"] else None,
        }
        for name, pick in chosen.items()
        if name != "random"
    }
    cs = [t["C"].get(x) for x in space.eligible]
    whole = None not in cs
    scores = [t["mean_score"].get(x) for x in space.eligible]
    out["random (expected)"] = {
        "layer": None,
        "regret": t["mean_score"][t["best"]] - float(np.mean(scores)) if whole else None,
        "C": float(np.mean(cs)) if whole else None,
        "in_top_set": sum(x in t["top_set"] for x in space.eligible) / len(cs) if whole else None,
    }
    return out


def check_truth(truth: dict[str, Any], config: Config, path: str) -> None:
    """A stored truth must have been measured as the config's searches run; only the lr may
    differ (the truth's is the long runs' lr, the config's the proxy's: a search knob)."""
    s = truth["settings"]
    wanted = settings(config, [], [], truth["steps"])  # what ground_truth.py records
    free = ("layers", "seeds", "steps", "lr")  # the truth's own extent, horizon and lr
    differ = [k for k, v in wanted.items() if k not in free and s.get(k) != v]
    if differ:
        raise SystemExit(
            f"{path} was measured with other settings than {config.model.name}'s config "
            f"({', '.join(f'{k}: {s.get(k)} against {wanted[k]}' for k in differ)})"
        )


def load_searches(path: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """The finished searches kept at `path` (none when new); another config's are refused."""
    done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if done and done.get("settings") != wanted:
        raise SystemExit(f"{path} holds searches of {done.get('settings')}; choose another file")
    return {"settings": wanted, "searches": done.get("searches", {})}


def regret(t: dict[str, Any], layer: int) -> float | None:
    """How much lower `layer`'s long-run score is than the long-run best's (None: unmeasured)."""
    if layer not in t["mean_score"]:
        return None
    return float(t["mean_score"][t["best"]] - t["mean_score"][layer])


def scored(run: dict[str, Any], t: dict[str, Any], long: Any, grid: list[int]) -> dict[str, Any]:
    """One search's pick, tied set and ranking against the truth, over the grid's layers the
    truth has measured; a layer the search never ran ranks below every layer it did."""
    scores = {int(x): v for x, v in run["scores"].items()}  # JSON keeps keys as text
    layers = [x for x in grid if x in t["mean_score"]]
    ranked = [scores.get(x, -np.inf) for x in layers]
    truth_order = [t["mean_score"][x] for x in layers]
    measured = run["pick"] in t["mean_score"]
    enough = len(layers) >= 3  # fewer layers give no usable rank correlation
    return {
        **run,
        "spearman_layers": len(layers),
        "spearman": float(stats.spearmanr(ranked, truth_order).statistic) if enough else None,
        "kendall": float(stats.kendalltau(ranked, truth_order).statistic) if enough else None,
        "pick_in_top_set": run["pick"] in t["top_set"] if measured else None,
        "tied_contains_long_best": long.best in run["tied"],
        "pick_long_C": t["C"].get(run["pick"]),
        "regret": regret(t, run["pick"]),
        "step_fraction": run["steps"] / t["sweep_steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--factor", type=int, default=5, help="long runs: factor x proxy.steps")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the ground truth")
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--root", default="/tmp/autolayer-fidelity")
    parser.add_argument("--cache", default=None, help="ground-truth JSON (default: under --root)")
    parser.add_argument("--truth", default=None, help="a stored truth to read, not measure")
    parser.add_argument("--task", default=None, help="a task name (default: the config's)")
    parser.add_argument("--space", default="single_layer", help="the searches' space")
    parser.add_argument("--searches", default=None, help="finished searches' JSON (resumes)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.task:
        config.task.name = args.task
    root = Path(args.root) / f"{Path(args.config).stem}-{config.task.name}"
    root.mkdir(parents=True, exist_ok=True)
    if args.truth:
        truth = json.loads(Path(args.truth).read_text())
        check_truth(truth, config, args.truth)
        print(f"ground truth: {args.truth}, {len(measured_layers(truth))} layers", flush=True)
    else:
        cache = Path(args.cache) if args.cache else root / "truth.json"
        steps = args.factor * config.proxy.steps
        print(f"ground truth: {args.config}, {steps} steps, {args.seeds} seeds", flush=True)
        truth = ground_truth(config, args.factor, args.seeds, cache)
    space = bind(load_space(args.space), truth["num_layers"])
    long, t = summarise_truth(truth, space.eligible)
    results: dict[str, Any] = {"config": args.config, "space": args.space, "truth": t}
    results["proxy_lr"] = config.proxy.lr
    results["heuristics"] = free_heuristics(truth, t, space)
    kept = Path(args.searches) if args.searches else root / f"searches-{args.space}.json"
    wanted = {
        "config": args.config, "task": config.task.name, "space": args.space,
        "lr": config.proxy.lr,
    }  # fmt: skip
    done = load_searches(kept, wanted)
    for seed in range(args.search_seeds):
        if str(seed) not in done["searches"]:
            print(f"search seed {seed}", flush=True)
            done["searches"][str(seed)] = search_once(config, seed, root, args.space)
            write_json(kept, done)
    searches = [done["searches"][str(s)] for s in range(args.search_seeds)]
    results["searches"] = [scored(run, t, long, space.eligible) for run in searches]
    # The pruners replayed as the search meets the layers: its warm start, then the grid's rest.
    warm = [p["layer"] for p in warm_start_params(space, None, truth["num_layers"], None)]
    order = [x for x in [*warm, *space.eligible] if x in t["mean_score"]]
    order = list(dict.fromkeys(order))
    results["misprunes"] = {
        pruner: [
            {"pruned": (pruned := replay_pruner(
                pruner, truth, s, config.proxy.steps, config.proxy.eval_every, order
            )), "mis_pruned": [x for x in pruned if x in t["top_set"]]}
            for s in truth_seeds(truth)
        ]
        for pruner in ("median", "interval")
    }  # fmt: skip
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


def _c(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(r: dict[str, Any]) -> None:
    t = r["truth"]
    print(
        f"\n## {r['config']}: ground truth {t['steps']} steps x {t['seeds']} seeds at lr "
        f"{t['lr']:g}; searches at proxy lr {r['proxy_lr']:g}"
    )
    if t["unmeasured"]:
        print(f"not in the truth yet (of the {r['space']} grid): {t['unmeasured']}")
    print("long-run score: " + ", ".join(f"L{x} {v:.3f}" for x, v in t["mean_score"].items()))
    print("long-run C: " + ", ".join(f"L{x} {_c(v)}" for x, v in t["C"].items()))
    full = "not run" if t["full_score"] is None else f"{t['full_score']:.3f}"
    print(
        f"all layers {full}; seed sd {t['seed_sd']:.3f}; "
        f"Spearman(depth, score) {t['spearman_depth']:+.2f}"
    )
    print(f"long-run best L{t['best']}; top set (tied with it): {t['top_set']}")
    print("\n| heuristic | layer | long-run C | regret | in top set |\n|---|---|---|---|---|")
    for name, h in r["heuristics"].items():
        layer = "-" if h["layer"] is None else h["layer"]
        print(f"| {name} | {layer} | {_c(h['C'])} | {_r(h['regret'])} | {h['in_top_set']} |")
    print(
        "\n| search seed | pick | tied set | pick in top set | tied set has long-run best "
        "| pick's long-run C | regret | Spearman (layers) | Kendall | steps (% of sweep) "
        "| seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(r["searches"]):
        print(
            f"| {i} | {s['pick']} | {s['tied']} | {s['pick_in_top_set']} "
            f"| {s['tied_contains_long_best']} | {_c(s['pick_long_C'])} | {_r(s['regret'])} "
            f"| {_s(s['spearman'])} ({s['spearman_layers']}) | {_s(s['kendall'])} "
            f"| {s['steps']} ({100 * s['step_fraction']:.0f}%) | {s['seconds']:.0f} |"
        )
    print(f"\nlong exhaustive sweep: {t['sweep_steps']} steps, {t['sweep_seconds']:.0f} s")
    print("\n| pruner | pruned, per truth seed | mis-pruned (in the long-run top set) |")
    print("|---|---|---|")
    for name, per_seed in r["misprunes"].items():
        pruned = "; ".join(str(p["pruned"]) for p in per_seed)
        mis = sum(len(p["mis_pruned"]) for p in per_seed)
        total = sum(len(p["pruned"]) for p in per_seed)
        print(f"| {name} | {pruned} | {mis} of {total} prunes |")


if __name__ == "__main__":
    main()
