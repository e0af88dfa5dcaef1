"""What a person looks at: the results table (from storage, at any time) and the study's plots."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from rich.table import Table

    from autolayer.search import SearchContext


@dataclass(frozen=True)
class Row:
    number: int
    layers: tuple[int, ...]
    lr: float | None
    state: str
    score: float | None
    contribution: float | None
    ci_low: float | None
    ci_high: float | None
    note: str

    @property
    def label(self) -> str:
        if not self.layers:
            return "-"
        ls = self.layers
        if len(ls) > 2 and ls == tuple(range(ls[0], ls[-1] + 1)):
            return f"{ls[0]}-{ls[-1]}"
        return ",".join(map(str, ls))


def _note(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    for key in ("fail_reason", "prune_reason"):
        if key in attrs:
            return str(attrs[key])
    if attrs.get("infeasible"):
        return "infeasible: violates the subset size limit"
    if "retry_of" in attrs:
        return f"retry of trial {attrs['retry_of']}"
    return ""


def trial_rows(study: optuna.Study) -> list[Row]:
    """One row per trial, in trial order, from what the trials stored."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append(
            Row(
                number=t.number,
                layers=tuple(a.get("layers", ())),
                lr=a.get("lr"),
                state=t.state.name,
                score=a.get("score"),
                contribution=a.get("contribution"),
                ci_low=a.get("ci_low"),
                ci_high=a.get("ci_high"),
                note=_note(t),
            )
        )
    return rows


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "score" in t.user_attrs
    ]
    return max(complete, key=lambda t: t.value if t.value is not None else -math.inf, default=None)


def references(study: optuna.Study) -> dict[str, float | None]:
    a = study.user_attrs
    return {"base": a.get("reference_base_score"), "full": a.get("reference_full_score")}


def format_contribution(value: float, low: float, high: float, gain: float) -> str:
    """`C [low, high]`, except that a zero-width interval is no certainty to print: every
    resample agreed because no held-out outcome changed (no change) or all moved alike."""
    if low == high:
        return "no change" if gain == 0 else f"{value:.2f} [no spread]"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def results_table(study: optuna.Study) -> Table:
    """Layer, score, contribution [CI] and state of every trial; the best is marked."""
    from rich.table import Table

    best = best_trial(study)
    refs = references(study)
    title = (
        f"study {study.study_name}: base score {_fmt(refs['base'])}, "
        f"all-layers score {_fmt(refs['full'])}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("trial", "layers", "lr", "score", "C [95% CI]", "state", "note"):
        table.add_column(column, justify="right" if column in ("trial", "score") else "left")
    for row in trial_rows(study):
        c = "-"
        if row.contribution is not None and row.ci_low is not None and row.ci_high is not None:
            gain = (row.score or 0.0) - (refs["base"] or 0.0)
            c = format_contribution(row.contribution, row.ci_low, row.ci_high, gain)
        if row.score is not None and row.contribution is None and refs["full"] is not None:
            c = "undefined"
        mark = " ★ best" if best is not None and row.number == best.number else ""
        table.add_row(
            str(row.number),
            row.label + mark,
            _fmt(row.lr, ".2g"),
            _fmt(row.score),
            c,
            row.state,
            row.note,
            style="bold green" if mark else None,
        )
    return table


def _bars(study: optuna.Study) -> list[tuple[str, float, float, float, str]]:
    """(label, value, err_low, err_high, kind) per candidate: completed trials with their C and CI,
    pruned ones at the last objective value they reported (kind "pruned")."""
    refs_defined = all(
        r.contribution is not None for r in trial_rows(study) if r.state == "COMPLETE"
    )
    bars: dict[str, tuple[str, float, float, float, str]] = {}
    for trial, row in zip(study.get_trials(deepcopy=False), trial_rows(study), strict=True):
        if row.state == "COMPLETE" and row.score is not None:
            value = row.contribution if refs_defined else row.score
            low = row.ci_low if refs_defined and row.ci_low is not None else value
            high = row.ci_high if refs_defined and row.ci_high is not None else value
            assert value is not None and low is not None and high is not None
            bars[row.label] = (row.label, value, value - low, high - value, "complete")
        elif row.state == "PRUNED" and trial.intermediate_values and row.label not in bars:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            bars[row.label] = (row.label, last, 0.0, 0.0, "pruned")
    return sorted(bars.values(), key=lambda b: [int(x) for x in re.findall(r"\d+", b[0])])


def plot_contributions(study: optuna.Study, path: Path) -> Path | None:
    """Bars of C per candidate (per layer for single-layer spaces) with 95% CIs; best marked.

    Pruned candidates are grey, at the value they had when stopped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = _bars(study)
    if not bars:
        return None
    use_c = all(r.contribution is not None for r in trial_rows(study) if r.state == "COMPLETE")
    best = best_trial(study)
    best_label = (
        Row(0, tuple(best.user_attrs["layers"]), None, "", None, None, None, None, "").label
        if best
        else None
    )
    colors = [
        "lightgray" if kind == "pruned" else "tab:green" if label == best_label else "tab:blue"
        for label, _, _, _, kind in bars
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(bars) + 2), 3.6))
    ax.bar(
        [b[0] for b in bars],
        [b[1] for b in bars],
        color=colors,
        capsize=3,
        yerr=[[b[2] for b in bars], [b[3] for b in bars]],
    )
    if use_c:
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="all layers (C = 1)")
        ax.axhline(0.0, color="black", linewidth=0.8)
    if any(b[4] == "pruned" for b in bars):
        ax.bar([], [], color="lightgray", label="pruned (value when stopped)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("trained layer(s)")
    ax.set_ylabel("contribution C (95% CI)" if use_c else "held-out score")
    ax.set_title(f"{study.study_name}: best in green", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_history(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's optimisation history (objective per trial and best so far)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    ax.set_ylabel(f"objective ({study.user_attrs.get('objective', 'C or score')})")
    ax.legend(loc="lower right", fontsize=8)
    fig: Any = ax.get_figure()
    fig.set_size_inches(6, 3.6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig: Any, path: Path) -> None:
    """Write a PNG beside `path` and rename it into place: a reader never sees half a plot."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def study_dir(root: Path, study_name: str) -> Path:
    """Where a study's plots go; a name that would leave `root/studies` is refused."""
    from autolayer.errors import AutolayerError

    base = (root / "studies").resolve()
    path = (base / study_name).resolve()
    if path.parent != base:
        raise AutolayerError(f"study name {study_name!r} would leave {base}: use a plain name")
    return path


def finish_study(ctx: SearchContext, root: Path, seconds: float) -> list[Path]:
    """Write the plots beside the store and log them, with a summary, to the study's parent run."""
    out = study_dir(root, ctx.study.study_name)
    paths = [
        p
        for p in (
            plot_contributions(ctx.study, out / "contribution.png"),
            plot_history(ctx.study, out / "history.png"),
        )
        if p is not None
    ]
    for path in paths:
        ctx.tracker.log_artifact(ctx.parent_run, path)
    best = best_trial(ctx.study)
    summary: dict[str, Any] = {"search/seconds": seconds, "search/trials": len(ctx.study.trials)}
    if best is not None:
        summary["search/best"] = float(best.value or 0.0)
        ctx.tracker.set_tags(
            ctx.parent_run, {"best_layers": ",".join(map(str, best.user_attrs["layers"]))}
        )
    ctx.tracker.log_metrics(ctx.parent_run, summary)
    return paths
