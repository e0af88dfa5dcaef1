"""What stored ground truths show: each model's long-run single-layer profile against relative
depth, with seed intervals, and how the profiles' rankings agree.

    python benchmarks/truth_profiles.py [benchmarks/truth/*.json] [--plot docs/truth-profiles.png]

Reads the JSON files `benchmarks/ground_truth.py` writes (finished or not: a partial sweep shows
the layers it has) and prints, per (model, task), one row per measured layer: its final held-out
score on each training seed, their mean, the seeds' spread, the gain over the base in standard
errors of the paired per-prompt difference (seeds pooled), and C = (S - S_base) / (S_full - S_base)
against the all-layers run at its swept lr, where that has run. Then the rank agreement of every
two profiles through `autolayer.compare` (Spearman and Kendall with permutation p and prompt-
bootstrap intervals): on one model over the layers both measured; across families by relative
depth, each layer of the shallower stack paired with the nearest layer of the other, since their
layers do not align one to one. The plot draws score against relative depth, one line per
(model, task), the seeds' range as error bars, the base and the all-layers score as flat lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from autolayer.compare import MIN_LAYERS, Profile, agreement
from autolayer.scoring import paired_gain

TRUTH = Path(__file__).resolve().parent / "truth"


def name_of(truth: dict[str, Any]) -> str:
    s = truth["settings"]
    return f"{Path(s['model']).name}/{s['task']}"


def layer_runs(truth: dict[str, Any], step: int | None = None) -> dict[int, list[list[float]]]:
    """Each measured single layer's outcomes, one list per training seed finished: at the end,
    or at the eval of `step` (the proxy's horizon: a long run's first `proxy_steps` steps are a
    proxy run on its seed, same prompts, same sampling, constant lr)."""
    found: dict[int, list[list[float]]] = {}
    for key, run in truth["runs"].items():
        if key.startswith("all"):
            continue
        outcomes = run["outcomes"] if step is None else run["curve_outcomes"][str(step)]
        found.setdefault(int(key.split("@")[0]), []).append(outcomes)
    return dict(sorted(found.items()))


def full_score(truth: dict[str, Any]) -> tuple[float, str] | None:
    """The all-layers runs' mean score at the swept lr (or the best lr tried so far)."""
    runs = truth["runs"]
    lr = truth.get("full_lr")
    seeds = [k for k in runs if k.startswith("all@") and ":" not in k]
    if lr is not None and seeds:
        return float(np.mean([np.mean(runs[k]["outcomes"]) for k in seeds])), f"lr {lr:g}"
    swept = {k: float(np.mean(r["outcomes"])) for k, r in runs.items() if k.startswith("all@")}
    if not swept:
        return None
    best = max(swept, key=lambda k: swept[k])
    return swept[best], f"{best.split(':')[-1]}, lr sweep unfinished"


def _gain_in_se(outcomes: Any, base: Any) -> float:
    """A paired per-prompt gain over the base in its standard errors."""
    gain, se = paired_gain(outcomes, base)
    return gain / se if se > 0 else float("nan")


def rows(truth: dict[str, Any], step: int | None = None) -> list[dict[str, Any]]:
    base = np.asarray(truth["base"], dtype=float)
    full = full_score(truth)
    last = truth["num_layers"] - 1
    out = []
    for layer, seeds in layer_runs(truth, step).items():
        finals = [float(np.mean(o)) for o in seeds]
        pooled = _gain_in_se(np.concatenate(seeds), np.tile(base, len(seeds)))
        per_seed = [_gain_in_se(o, base) for o in seeds]
        mean = float(np.mean(finals))
        gain = mean - float(base.mean())
        c = None
        if full is not None and full[0] != base.mean():
            c = gain / (full[0] - float(base.mean()))
        out.append(
            {
                "layer": layer,
                "depth": layer / last,
                "seeds": finals,
                "mean": mean,
                "spread": max(finals) - min(finals),
                "gain_se": pooled,
                "seed_gain_se": per_seed,
                "C": c,
            }
        )
    return out


def table(truth: dict[str, Any], step: int | None = None) -> str:
    base = float(np.mean(truth["base"]))
    full = full_score(truth)
    s = truth["settings"]
    steps = truth["steps"] if step is None else step
    head = (
        f"### {name_of(truth)}: {truth['num_layers']} layers, {steps} steps "
        f"({s['prompts_per_step']}x{s['num_generations']}, lr {s['lr']:g}), training seeds "
        f"{s['seeds']}, {len(truth['base'])} held-out prompts\n\nbase {base:.3f}; all layers "
        + (f"{full[0]:.3f} ({full[1]})" if full else "not run yet")
        + "\n\n| layer | relative depth | score per seed | gain per seed (SE) | mean | seed spread "
        "| gain, seeds pooled (SE) | C |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = [
        f"| {r['layer']} | {r['depth']:.2f} | {', '.join(f'{x:.3f}' for x in r['seeds'])} | "
        f"{', '.join(f'{x:+.1f}' for x in r['seed_gain_se'])} | {r['mean']:.3f} | "
        f"{r['spread']:.3f} | {r['gain_se']:+.1f} | "
        + ("" if r["C"] is None else f"{r['C']:.2f}")
        + " |"
        for r in rows(truth, step)
    ]
    if step is not None:
        return head + "\n".join(body) + "\n(C: against the all-layers run's end)\n"
    runs = distinct_runs(truth)
    hours = sum(run["seconds"] for run in runs) / 3600
    done = len(runs)
    return head + "\n".join(body) + f"\n\n{done} long runs, {hours:.1f} h of one core.\n"


def distinct_runs(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """Every long run once: `all@<first seed>` repeats the lr sweep's best run."""
    first = truth["settings"]["seeds"][0]
    swept = any(k.startswith(f"all@{first}:") for k in truth["runs"])
    return [r for k, r in truth["runs"].items() if not (swept and k == f"all@{first}")]


def profile_of(
    truth: dict[str, Any], pick: list[int] | None = None, step: int | None = None
) -> Profile:
    """The truth as `autolayer.compare` reads a study: per layer, every prompt's outcome
    averaged over the seeds finished. `pick` keeps those layers (in that order) and labels
    them 0, 1, ... (relative-depth pairing across models)."""
    runs = layer_runs(truth, step)
    layers = list(runs) if pick is None else pick
    outcomes = np.array([np.mean(np.asarray(runs[x], dtype=float), axis=0) for x in layers])
    labels = tuple(layers) if pick is None else tuple(range(len(layers)))
    model = truth["settings"]["model"] if pick is None else "relative depth"
    name = name_of(truth) + ("" if step is None else f"@{step}")
    return Profile(name, model, labels, outcomes)


def paired_by_depth(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Each measured layer of the stack with fewer of them, and the other's nearest by depth."""
    la, lb = list(layer_runs(a)), list(layer_runs(b))
    da = {x: x / (a["num_layers"] - 1) for x in la}
    db = {x: x / (b["num_layers"] - 1) for x in lb}
    if len(la) > len(lb):
        pb, pa = paired_by_depth(b, a)
        return pa, pb
    nearest = [min(lb, key=lambda y: abs(db[y] - da[x])) for x in la]
    return la, nearest


AGREEMENT_HEADER = [
    "| profiles | aligned by | layers | Spearman (95% CI), p | Kendall, p |",
    "|---|---|---|---|---|",
]


def agreement_line(g: Any, aligned: str) -> str:
    """One row of an `autolayer.compare` agreement table (header: AGREEMENT_HEADER)."""
    return (
        f"| {g.first} vs {g.second} | {aligned} | {g.layers} "
        f"| {g.spearman:+.2f} ({g.spearman_ci[0]:+.2f}, {g.spearman_ci[1]:+.2f}), "
        f"{g.spearman_p:.3f} | {g.kendall:+.2f}, {g.kendall_p:.3f} |"
        + (f" {g.note}" if g.note else "")
    )


def agreements(truths: list[dict[str, Any]]) -> str:
    lines = list(AGREEMENT_HEADER)
    for truth in truths:  # the proxy's horizon against the long run, same seeds
        step = truth["settings"]["proxy_steps"]
        if len(layer_runs(truth)) >= MIN_LAYERS:
            lines.append(
                agreement_line(agreement(profile_of(truth, step=step), profile_of(truth)), "layer")
            )
    for a, b in itertools.combinations(truths, 2):
        same = a["settings"]["model"] == b["settings"]["model"]
        if same:
            pa, pb = profile_of(a), profile_of(b)
            shared = sorted(set(pa.layers) & set(pb.layers))
            pa, pb = profile_of(a, shared), profile_of(b, shared)
        else:
            la, lb = paired_by_depth(a, b)
            pa, pb = profile_of(a, la), profile_of(b, lb)
        if len(pa.layers) < MIN_LAYERS:
            continue
        lines.append(agreement_line(agreement(pa, pb), "layer" if same else "relative depth"))
    return "\n".join(lines) + "\n"


def plot(truths: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, truth in enumerate(truths):
        color = f"C{i}"
        r = rows(truth)
        x = [row["depth"] for row in r]
        y = [row["mean"] for row in r]
        lo = [row["mean"] - min(row["seeds"]) for row in r]
        hi = [max(row["seeds"]) - row["mean"] for row in r]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=color, label=name_of(truth))
        ax.axhline(float(np.mean(truth["base"])), color=color, linestyle="--", linewidth=0.8)
        full = full_score(truth)
        if full is not None:
            ax.axhline(full[0], color=color, linestyle=":", linewidth=1.2)
    ax.set_xlabel("relative depth of the one trained layer (0 = first, 1 = last)")
    ax.set_ylabel("held-out score after the long run")
    ax.set_title("Long-run single-layer profiles (bars: range over training seeds;\n"
                 "dashed: base model, dotted: all layers trained)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("truths", nargs="*", type=Path, help="default: benchmarks/truth/*.json")
    parser.add_argument("--plot", type=Path, default=None, help="write the profiles plot here")
    args = parser.parse_args()
    paths = args.truths or sorted(TRUTH.glob("*.json"))
    truths = [json.loads(p.read_text()) for p in paths]
    # a ground truth has a base score; the lr sweeps and kept searches beside them do not
    truths = [t for t in truths if "base" in t and layer_runs(t)]
    for truth in truths:
        print(table(truth))
        print(table(truth, truth["settings"]["proxy_steps"]))
    print(agreements(truths))
    if args.plot is not None and truths:
        plot(truths, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
