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


def register_analyze_command(sub: Any) -> None:
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
    from autolayer.export import write_text_atomic
    from autolayer.report import save_figure

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "analysis.json", json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise AutolayerError(f"cannot write the analysis to {out}: {err.strerror}") from None
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
