"""What a person looks at: the results table (from storage, at any time) and the study's plots."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from autolayer.estimate import PROMPT_NOISE_ONLY, format_contribution
from autolayer.study import (
    StudyRecord,
    TrialRecord,
    best_trial,
    measured,
    records,
    study_analysis,
)

if TYPE_CHECKING:
    from rich.table import Table

    from autolayer.estimate import Analysis
    from autolayer.study import CandidateKey


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
    seed: int | None = None
    ci_seed_df: int = 0  # the seed term's df in the C interval (0: prompt noise only)

    @property
    def label(self) -> str:
        if not self.layers:
            return "-"
        ls = self.layers
        if len(ls) > 2 and ls == tuple(range(ls[0], ls[-1] + 1)):
            return f"{ls[0]}-{ls[-1]}"
        return ",".join(map(str, ls))


def trial_rows(study: optuna.Study) -> list[Row]:
    """One row per trial, in trial order, from what the trials stored."""
    return [
        Row(
            number=r.number,
            layers=r.layers,
            lr=r.lr,
            state=r.state.name,
            score=r.score,
            contribution=r.contribution,
            ci_low=r.ci_low,
            ci_high=r.ci_high,
            note=r.note,
            seed=r.seed,
            ci_seed_df=r.ci_seed_df,
        )
        for r in records(study)
    ]


def layers_label(layers: tuple[int, ...]) -> str:
    return Row(0, layers, None, "", None, None, None, None, "").label


@dataclass(frozen=True)
class CandidateRow:
    """One measured candidate over all its seeds (`autolayer.estimate`)."""

    layers: tuple[int, ...]
    lr: float
    seeds: int
    score: float
    score_low: float
    score_high: float
    contribution: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str  # "best", "tied" (statistically indistinguishable from the best) or ""
    baselines: tuple[str, ...]  # the free heuristics that pick this candidate

    @property
    def label(self) -> str:
        return layers_label(self.layers)


def candidate_rows(study: optuna.Study) -> tuple[list[CandidateRow], Analysis[CandidateKey] | None]:
    """Every measured candidate, best score first, with its heuristics and verdict."""
    analysis = study_analysis(study)
    if analysis is None:
        return [], None
    record = StudyRecord.of(study)
    named: dict[tuple[int, ...], list[str]] = {}
    for name, layers in record.baselines.items():
        named.setdefault(layers, []).append(name)
    baseline_lr = record.baselines_lr  # the heuristics ran at the pick's lr
    rows = []
    for key, e in analysis.estimates.items():
        layers, lr = key
        heuristics = named.get(layers, ()) if baseline_lr in (None, lr) else ()
        verdict = "best" if key == analysis.best else "tied" if key in analysis.tied else ""
        rows.append(
            CandidateRow(
                layers, lr, e.seeds, e.score, e.score_low, e.score_high, e.contribution, e.low,
                e.high, verdict, tuple(heuristics),
            )
        )  # fmt: skip
    return sorted(rows, key=lambda r: -r.score), analysis


def horizon(study: optuna.Study) -> str:
    steps = StudyRecord.of(study).proxy_steps
    return f"at the proxy horizon of {steps} steps" if steps else "at the proxy horizon"


def candidates_table(study: optuna.Study) -> Table:
    """The answer: each candidate over its seeds, the tied-best set and the free heuristics."""
    from rich.table import Table

    rows, analysis = candidate_rows(study)
    refs = references(study)
    title = (
        f"study {study.study_name}: C {horizon(study)}; base score {_fmt(refs['base'])}, "
        f"all-layers score {_fmt(refs['full'])}"
    )
    caption = analysis.method if analysis is not None else None
    mark = ""  # on the intervals' headers when they lack the seed term
    if analysis is not None and analysis.seed_df == 0:
        mark = "*"
        caption = f"{caption}\n* {PROMPT_NOISE_ONLY}"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ("layers", "lr", "seeds", f"score [95% CI{mark}]", f"C [95% CI{mark}]", "verdict")
    for column in (*columns, "heuristic"):
        table.add_column(column, justify="right" if column in ("seeds",) else "left")
    for row in rows:
        c = "-"
        if row.contribution is not None and row.ci_low is not None and row.ci_high is not None:
            gain = row.score - (refs["base"] or 0.0)
            c = format_contribution(row.contribution, row.ci_low, row.ci_high, gain)
        elif refs["full"] is not None:
            c = "undefined"
        verdict = {"best": "★ best", "tied": "tied with best"}.get(row.verdict, "")
        table.add_row(
            row.label,
            _fmt(row.lr, ".2g"),
            str(row.seeds),
            f"{row.score:.3f} [{row.score_low:.3f}, {row.score_high:.3f}]",
            c,
            verdict,
            ", ".join(row.baselines),
            style="bold green" if row.verdict == "best" else "green" if row.verdict else None,
        )
    return table


def verdict_lines(study: optuna.Study) -> list[str]:
    """Plain sentences: the tied-best set, and whether the search beat each free heuristic."""
    rows, analysis = candidate_rows(study)
    if analysis is None:
        return []
    best = rows[0]
    tied = [r.label for r in rows if r.verdict]
    lines = [
        f"pick: layers {best.label} (seeds {best.seeds}); statistically tied with it: "
        + (", ".join(t for t in tied if t != best.label) or "none")
    ]
    if analysis.seed_df == 0:
        lines.append(f"  note: {PROMPT_NOISE_ONLY}")
    for row in rows:
        for name in row.baselines:
            outcome = (
                "is the pick" if row.verdict == "best"
                else "is tied with the pick" if row.verdict == "tied"
                else "is worse than the pick"
            )  # fmt: skip
            lines.append(
                f"  {name} heuristic (layers {row.label}) {outcome}: score {row.score:.3f}"
            )
    return lines


def references(study: optuna.Study) -> dict[str, float | None]:
    record = StudyRecord.of(study)
    return {"base": record.base_score, "full": record.full_score}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def results_table(study: optuna.Study) -> Table:
    """Every trial: layers, seed, score, C with the interval the candidates table gave it when
    the trial finished (marked where that was prompt noise only), state and why; the first
    trial of the best candidate is marked."""
    from rich.table import Table

    best = best_trial(study)
    refs = references(study)
    title = (
        f"study {study.study_name}: base score {_fmt(refs['base'])}, "
        f"all-layers score {_fmt(refs['full'])}"
    )
    rows = trial_rows(study)
    caption = None
    if any(row.ci_low is not None and not row.ci_seed_df for row in rows):
        caption = (
            "C's interval is the one the candidates table gave the trial when it finished; * "
            "marks those from before any repeat on a second training seed: prompt noise only, "
            "too narrow"
        )
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in ("trial", "layers", "lr", "seed", "score", "C [95% CI]", "state", "note"):
        table.add_column(
            column, justify="right" if column in ("trial", "score", "seed") else "left"
        )
    for row in rows:
        c = "-"
        if row.contribution is not None and row.ci_low is not None and row.ci_high is not None:
            gain = (row.score or 0.0) - (refs["base"] or 0.0)
            c = format_contribution(row.contribution, row.ci_low, row.ci_high, gain)
            c += "" if row.ci_seed_df else " *"
        if row.score is not None and row.contribution is None and refs["full"] is not None:
            c = "undefined"
        mark = " ★ best" if best is not None and row.number == best.number else ""
        table.add_row(
            str(row.number),
            row.label + mark,
            _fmt(row.lr, ".2g"),
            "-" if row.seed is None else str(row.seed),
            _fmt(row.score),
            c,
            row.state,
            row.note,
            style="bold green" if mark else None,
        )
    return table


BASELINE_MARKS = {"middle": "M", "last": "L", "spectrum": "S", "random": "R"}
LEGEND = (  # bar colour, what it marks (the other bars are blue): listed when some bar has it
    ("tab:green", "best"),
    ("yellowgreen", "tied with the best"),
    ("lightgray", "pruned (value when stopped)"),
)


def _pruned_only(study: optuna.Study, measured: set[tuple[int, ...]]) -> dict[str, float]:
    """Candidates that were only ever pruned: label -> last objective value they reported."""
    out: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        layers = TrialRecord.of(t).layers
        if layers and layers not in measured and t.intermediate_values:
            out.setdefault(layers_label(layers), t.intermediate_values[max(t.intermediate_values)])
    return out


def _sort_key(label: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", label)]


def plot_contributions(study: optuna.Study, path: Path) -> Path | None:
    """Bars of C per candidate over its seeds, with 95% intervals (seed and prompt noise; the
    title says when no repeat gave a seed term).

    The best is dark green and the candidates tied with it light green; pruned candidates are
    grey, at the value they had when stopped; letters above the bars mark the free heuristics'
    picks (M middle, L last, S Spectrum, R random).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, analysis = candidate_rows(study)
    if not rows or analysis is None:
        return None
    use_c = all(r.contribution is not None for r in rows)
    bars = []  # label, value, err low, err high, color, marks
    for r in rows:
        value, low, high = (
            (r.contribution, r.ci_low, r.ci_high) if use_c else (r.score, r.score_low, r.score_high)
        )
        assert value is not None and low is not None and high is not None
        color = {"best": "tab:green", "tied": "yellowgreen"}.get(r.verdict, "tab:blue")
        marks = "".join(BASELINE_MARKS.get(b, "?") for b in r.baselines)
        bars.append((r.label, value, max(0.0, value - low), max(0.0, high - value), color, marks))
    pruned = _pruned_only(study, {r.layers for r in rows})
    bars += [(label, value, 0.0, 0.0, "lightgray", "") for label, value in pruned.items()]
    bars.sort(key=lambda b: _sort_key(b[0]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(bars) + 2), 3.8))
    ax.bar(
        [b[0] for b in bars],
        [b[1] for b in bars],
        color=[b[4] for b in bars],
        capsize=3,
        yerr=[[b[2] for b in bars], [b[3] for b in bars]],
    )
    for i, b in enumerate(bars):
        if b[5]:
            ax.annotate(b[5], (i, b[1] + b[3]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
    from matplotlib.patches import Patch

    kinds = {b[4] for b in bars}
    handles: list[Any] = [
        Patch(color=color, label=label) for color, label in LEGEND if color in kinds
    ]
    if use_c:
        line = ax.axhline(
            1.0, color="gray", linestyle="--", linewidth=1, label="all layers (C = 1)"
        )
        handles.append(line)
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.legend(handles=handles, loc="upper left", fontsize=7)
    ax.margins(y=0.15)  # room for the heuristics' letters above the tallest bar
    ax.set_xlabel("trained layer(s); M middle, L last, S Spectrum, R random")
    ax.set_ylabel("contribution C (95% CI)" if use_c else "held-out score (95% CI)")
    noise = (
        "seed and prompt noise"
        if analysis.seed_df
        else "prompt noise only (no repeat on a second seed): too narrow"
    )
    ax.set_title(f"{study.study_name}\n{horizon(study)}; {noise}", fontsize=9)
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
    ax.set_ylabel(f"objective ({StudyRecord.of(study).objective or 'C or score'})")
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
    from autolayer.files import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def study_dir(root: Path, study_name: str) -> Path:
    """Where a study's plots go; a name that would leave `root/studies` is refused."""
    from autolayer.errors import AutolayerError

    base = (root / "studies").resolve()
    path = (base / study_name).resolve()
    if path.parent != base:
        raise AutolayerError(f"study name {study_name!r} would leave {base}: use a plain name")
    return path


def pick(study: optuna.Study) -> dict[str, Any] | None:
    """The study's answer, the results table's best row: the best candidate over its seeds,
    with its C and score intervals, its trials and the candidates tied with it."""
    rows, analysis = candidate_rows(study)
    best = next((r for r in rows if r.verdict == "best"), None)
    if analysis is None or analysis.best is None or best is None:
        return None
    trials = sorted(t.number for t in measured(study)[analysis.best].values())
    return {
        "layers": list(best.layers),
        "lr": best.lr,
        "seeds": best.seeds,
        "trials": trials,
        "score": _round(best.score),
        "score_ci": [_round(best.score_low), _round(best.score_high)],
        "contribution": _round(best.contribution),
        "contribution_ci": [_round(best.ci_low), _round(best.ci_high)],
        "tied": [list(r.layers) for r in rows if r.verdict == "tied"],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def answer_value(answer: dict[str, Any]) -> tuple[float, float, float]:
    """The pick's objective and its interval: C where defined, else the held-out score."""
    if answer["contribution"] is not None:
        return answer["contribution"], *answer["contribution_ci"]
    return answer["score"], *answer["score_ci"]


NOTE_TITLE = "## The answer"  # a study note that opens otherwise is a person's: left alone


def answer_line(study: optuna.Study, answer: dict[str, Any]) -> str:
    """The answer in one Markdown sentence, as the results table's best row says it."""
    value, low, high = answer_value(answer)
    name = "C" if answer["contribution"] is not None else "held-out score"
    tied = ", ".join(layers_label(tuple(t)) for t in answer["tied"]) or "none"
    return (
        f"**layers {layers_label(tuple(answer['layers']))}** (lr {answer['lr']:.2g}): {name} "
        f"{value:.3g} [{low:.3g}, {high:.3g}] {horizon(study)}, over {answer['seeds']} training "
        f"seed(s) (trials {', '.join(map(str, answer['trials']))}); tied with it: {tied}."
    )


def dashboard_note(study: optuna.Study, answer: dict[str, Any]) -> str:
    """Markdown for optuna-dashboard's Note page of the study: the answer and where it is."""
    record = StudyRecord.of(study)
    lines = [
        NOTE_TITLE,
        answer_line(study, answer),
        "",
        "Optuna's best trial is the best single trial value. A racing repeat's value is its "
        "candidate's over every seed, so it names the pick unless one lucky seed of a "
        "candidate beat the pick's mean. The study attr `pick` holds this answer; "
        f"`autolayer results --study-name {study.study_name}` prints the table behind it.",
    ]
    if record.runs_url:
        lines += ["", f"MLflow: [the study's runs]({record.runs_url})"]
    return "\n".join(lines)


def save_dashboard_note(study: optuna.Study, body: str) -> None:
    """Write the study's note in optuna-dashboard, unless a person wrote one."""
    from optuna_dashboard import get_note, save_note

    current = get_note(study)
    if not current or current.startswith(NOTE_TITLE):
        save_note(study, body)


def results_json(study: optuna.Study) -> dict[str, Any]:
    """The candidates table, the trials and the method, as plain data."""
    rows, analysis = candidate_rows(study)
    record = StudyRecord.of(study)
    return {
        "study": study.study_name,
        "horizon_steps": record.proxy_steps,
        "references": references(study),
        "method": analysis.method if analysis is not None else None,
        "seed_sd": analysis.seed_sd if analysis is not None else None,
        "seed_noise_included": analysis.seed_df > 0 if analysis is not None else None,
        "candidates": [{**vars(r), "layers": list(r.layers)} for r in rows],
        "baselines": {name: list(layers) for name, layers in record.baselines.items()},
        "pick": pick(study),
        "trials": [{**vars(r), "layers": list(r.layers)} for r in trial_rows(study)],
    }
