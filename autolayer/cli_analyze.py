"""`autolayer analyze`: what RL changed in a trained model or delta, against its base."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from autolayer.errors import AutolayerError

DEFAULT_K = 8  # top singular directions compared (principal angles, principal mask)
DEFAULT_ALPHA = 0.05  # share of entries in the principal and low-magnitude masks


def register_analyze_commands(sub: Any) -> None:
    _analyze_parser(sub)
    _compare_parser(sub)


def _compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="How well several studies' layer rankings agree (Spearman, Kendall).",
        description="Align the single-layer profiles of two or more studies on one model "
        "(different tasks, algorithms or data) and report Spearman's rho and Kendall's tau "
        "for every pair, with exact permutation p-values and bootstrap intervals that resample "
        "each study's held-out prompts. A profile too noisy to rank is flagged. Draws a "
        "heatmap and the overlaid profiles, and logs them to MLflow.",
    )
    p.add_argument("studies", nargs="+", metavar="STUDY", help="Study names (two or more).")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default: the journal).")
    p.add_argument("--root", metavar="DIR", default="mlruns", help="Embedded stores (mlruns).")
    p.add_argument(
        "--out", metavar="DIR", help="Where the PNGs and JSON go (default ROOT/compare)."
    )
    p.add_argument("--json", action="store_true", help="Print JSON for pipelines.")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI.")
    p.add_argument("--no-tracking", action="store_true", help="Do not log to MLflow.")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from autolayer.compare import agreements, noisiness, profile
    from autolayer.storage import load_study

    if len(args.studies) < 2:
        raise AutolayerError("compare needs at least two studies")
    root = Path(args.root)
    profiles = [profile(load_study(name, args.storage, root)) for name in args.studies]
    pairs = agreements(profiles)
    result = {
        "profiles": {
            p.study: {"layers": list(p.layers), "scores": p.scores.tolist(),
                      "stability": noisiness(p)}
            for p in profiles
        },
        "pairs": [dataclasses.asdict(a) for a in pairs],
    }  # fmt: skip
    out = Path(args.out) if args.out else root / "compare"
    paths = _compare_plots(out, profiles, pairs)
    _write_json(out / "compare.json", result)
    if not args.no_tracking:
        _log_compare(args, root, result, [*paths, out / "compare.json"])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_compare(result, paths)
    return 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from autolayer.files import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    except OSError as err:
        raise AutolayerError(f"cannot write {path}: {err.strerror}") from None


def _compare_plots(out: Path, profiles: list[Any], pairs: list[Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from autolayer.report import save_figure

    names = [p.study for p in profiles]
    rho = np.eye(len(names))
    for a in pairs:
        i, j = names.index(a.first), names.index(a.second)
        rho[i, j] = rho[j, i] = a.spearman
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 1.0 * len(names)))
    image = ax.imshow(rho, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rho[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    fig.tight_layout()
    save_figure(fig, out / "compare_heatmap.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in profiles:  # each profile min-max scaled so tasks of different scale overlay
        s = p.scores
        span = float(s.max() - s.min()) or 1.0
        ax.plot(p.layers, (s - s.min()) / span, marker="o", label=p.study)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out score, scaled to [0, 1] per study")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "compare_profiles.png")
    plt.close(fig)
    return [out / "compare_heatmap.png", out / "compare_profiles.png"]


def _log_compare(args: argparse.Namespace, root: Path, result: dict, paths: list[Path]) -> None:
    from autolayer.tracking import make_tracker

    tracker = make_tracker(True, args.tracking_uri, "autolayer-compare", root)
    run_id = tracker.start_run(
        "compare " + " ".join(args.studies), tags={"autolayer.role": "compare"}
    )
    tracker.log_params(run_id, {"studies": ",".join(args.studies)})
    for pair in result["pairs"]:
        key = f"{pair['first']}~{pair['second']}"
        tracker.log_metrics(run_id, {f"spearman/{key}": pair["spearman"],
                                     f"kendall/{key}": pair["kendall"]})  # fmt: skip
    for path in paths:
        tracker.log_artifact(run_id, path)
    tracker.end_run(run_id)


def _print_compare(result: dict[str, Any], paths: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="layer-ranking agreement (95% bootstrap intervals; exact p)")
    for column in ("first", "second", "layers", "Spearman rho", "p", "Kendall tau", "p", "note"):
        table.add_column(column)
    for a in result["pairs"]:
        table.add_row(
            a["first"], a["second"], str(a["layers"]),
            f"{a['spearman']:.2f} [{a['spearman_ci'][0]:.2f}, {a['spearman_ci'][1]:.2f}]",
            f"{a['spearman_p']:.3g}",
            f"{a['kendall']:.2f} [{a['kendall_ci'][0]:.2f}, {a['kendall_ci'][1]:.2f}]",
            f"{a['kendall_p']:.3g}", a["note"],
        )  # fmt: skip
    console = Console(width=160)
    console.print(table)
    console.print("plots: " + ", ".join(map(str, paths)), highlight=False, soft_wrap=True)


def _analyze_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="What RL changed: sparsity, update norms, spectrum and subspaces, per matrix.",
        description="Compare a trained model (--trained) or an autolayer delta (--delta) with "
        "its base: update sparsity by the absolute (|dW| <= 1e-5, arXiv 2505.11711) and the "
        "bf16-relative (arXiv 2511.08567) probes, relative update norm, normalised spectral "
        "shift, largest principal angle of the top-k singular subspaces, overlap of the update "
        "with the principal and low-magnitude masks against chance, and the share of the update "
        "that bf16 storage would drop. --other compares two runs' update masks (o1, o2, Jaccard).",
    )
    p.add_argument("--base", required=True, metavar="MODEL", help="The base: hub id or path.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--trained", metavar="DIR", help="A trained HF model directory.")
    what.add_argument("--delta", metavar="DIR", help="A delta written by `autolayer train`.")
    p.add_argument("--other", metavar="DIR", help="A second run (model or delta) to compare.")
    p.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"Top-k subspace (default {DEFAULT_K})."
    )
    p.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="Mask density (default 0.05)."
    )
    p.add_argument("--json", action="store_true", help="Print JSON for pipelines.")
    p.add_argument("--out", metavar="DIR", help="Also write analysis.json and analysis.png here.")
    p.set_defaults(handler=cmd_analyze)


def _weights(path: str, base: Any) -> dict[str, Any]:
    """The trained tensors of a delta (checked against `base`) or of a trained model directory,
    keeping only the parameters that differ from the base."""
    import torch

    from autolayer.delta import MANIFEST_FILE, check_base, load_delta
    from autolayer.models import load_model

    if (Path(path) / MANIFEST_FILE).is_file():
        manifest, tensors = load_delta(path)
        check_base(base, manifest)  # a delta of another base is one sentence
        return dict(tensors)
    model, _ = load_model(path, dtype="float32", device="cpu")
    base_params = dict(base.named_parameters())
    out = {}
    for name, param in model.named_parameters():
        if name not in base_params or base_params[name].shape != param.shape:
            raise AutolayerError(
                f"{path} is not a trained copy of the base: {name} differs in shape"
            )
        if not torch.equal(param, base_params[name]):
            out[name] = param.detach()
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from autolayer.analysis import analyze_matrix, by_layer, compare_updates, layer_of
    from autolayer.models import find_layer_stack, load_model

    if args.k < 1 or not 0 < args.alpha < 1:
        raise AutolayerError("--k must be at least 1 and --alpha between 0 and 1")
    base, _ = load_model(args.base, dtype="float32", device="cpu")
    trained = _weights(args.trained or args.delta, base)
    if not trained:
        raise AutolayerError("the trained model equals its base: nothing changed")
    params = {n: p.detach() for n, p in base.named_parameters()}
    stack = find_layer_stack(base).path
    reports = [
        analyze_matrix(n, params[n], w, layer_of(n, stack), args.k, args.alpha)
        for n, w in sorted(trained.items())
    ]
    result: dict[str, Any] = {
        "base": args.base,
        "trained": args.trained or args.delta,
        "k": args.k,
        "alpha": args.alpha,
        "matrices": [dataclasses.asdict(r) for r in reports],
        "layers": by_layer(reports),
    }
    if args.other:
        result["runs"] = compare_updates(params, trained, _weights(args.other, base))
    if args.out:
        _write(Path(args.out), result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


def _write(out: Path, result: dict[str, Any]) -> None:
    from autolayer.report import save_figure

    _write_json(out / "analysis.json", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["matrices"]
    labels = [r["name"].rsplit(".", 2)[-2] + f"@{r['layer']}" for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(rows)), 6), sharex=True)
    top.bar(range(len(rows)), [r["relative_norm"] for r in rows])
    top.set_ylabel("||dW|| / ||W||")
    bottom.bar(range(len(rows)), [1 - r["sparsity_abs"] for r in rows], label="abs probe")
    bottom.plot(range(len(rows)), [1 - r["sparsity_rel"] for r in rows], "k.", label="bf16 rel")
    bottom.set_ylabel("share updated")
    bottom.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    bottom.legend()
    fig.tight_layout()
    save_figure(fig, out / "analysis.png")
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"what changed: {result['trained']} against {result['base']}")
    columns = ("parameter", "sparsity abs", "sparsity bf16", "|dW|/|W|", "NSS", "max angle",
               "in principal", "in low-mag", "bf16 drops")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "parameter" else "right")
    for r in result["matrices"]:
        chance = f" ({r['mask_chance']:.2f})" if r["mask_chance"] is not None else ""
        table.add_row(
            r["name"],
            _fmt(r["sparsity_abs"], ".3f"),
            _fmt(r["sparsity_rel"], ".3f"),
            _fmt(r["relative_norm"], ".2e"),
            _fmt(r["nss"], ".2e"),
            _fmt(r["max_angle_deg"], ".2f") + ("°" if r["max_angle_deg"] is not None else ""),
            _fmt(r["principal_overlap"], ".3f") + chance,
            _fmt(r["low_magnitude_overlap"], ".3f") + chance,
            _fmt(r["bf16_dropped"], ".3f"),
        )
    console = Console(width=160)
    console.print(table)
    if "runs" in result:
        r = result["runs"]
        console.print(
            f"two runs' update masks: o1 {r['o1']:.3f} (chance {r['o1_chance']:.3f}), "
            f"o2 {r['o2']:.3f} (chance {r['o2_chance']:.3f}), "
            f"Jaccard {r['jaccard']:.3f} (chance {r['jaccard_chance']:.3f})"
        )
