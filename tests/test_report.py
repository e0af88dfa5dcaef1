"""What a person reads: zero-width intervals, plots written whole, study names kept inside root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from autolayer.errors import AutolayerError  # noqa: E402
from autolayer.report import save_figure, study_dir  # noqa: E402


def test_a_study_name_cannot_leave_the_root(tmp_path: Path) -> None:
    assert study_dir(tmp_path, "s-1") == (tmp_path / "studies" / "s-1").resolve()
    for name in ("../x", "a/b", "/etc"):
        with pytest.raises(AutolayerError, match="would leave"):
            study_dir(tmp_path, name)


def test_a_figure_is_renamed_into_place_whole(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left


def _study_with_two_seeds(pruned: bool = True) -> object:
    """Layers 6 and 7 on two seeds each, 3 and 5 on one; layer 2 pruned; heuristics recorded."""
    import numpy as np
    import optuna

    from autolayer.study import CONTRIBUTION_OBJECTIVE, write_study, write_trial

    def outcomes(correct: int, n: int = 400) -> list[float]:
        return (np.arange(n) < correct).astype(float).tolist()

    study = optuna.create_study(study_name="s", direction="maximize")
    write_study(
        study,
        reference_base_outcomes=outcomes(200),
        reference_full_outcomes=outcomes(320),
        reference_base_score=0.5,
        reference_full_score=0.8,
        objective=CONTRIBUTION_OBJECTIVE,
        proxy_steps=30,
        baselines={"middle": [3], "last": [7], "spectrum": [2]},
    )
    for layer, seed, correct in (
        (3, 0, 260),
        (5, 0, 300),
        (6, 0, 330),
        (7, 0, 340),
        (6, 1, 326),
        (7, 1, 344),
    ):
        trial = study.ask()
        score = correct / 400
        write_trial(
            trial, layers=[layer], lr=1e-3, seed=seed, score=score, outcomes=outcomes(correct)
        )
        study.tell(trial, (score - 0.5) / 0.3)
    if pruned:
        stopped = study.ask()
        write_trial(stopped, layers=[2])
        stopped.report(0.2, 10)
        study.tell(stopped, state=optuna.trial.TrialState.PRUNED)
    return study


def test_candidates_are_averaged_over_seeds_and_marked_best_tied_and_heuristic() -> None:
    from autolayer.report import candidate_rows, verdict_lines

    rows, analysis = candidate_rows(_study_with_two_seeds())  # type: ignore[arg-type]
    assert analysis is not None and analysis.seed_df == 2
    assert [(r.layers, r.seeds) for r in rows] == [((7,), 2), ((6,), 2), ((5,), 1), ((3,), 1)]
    assert rows[0].score == pytest.approx(0.855) and rows[0].verdict == "best"
    assert rows[0].contribution == pytest.approx((0.855 - 0.5) / 0.3)
    assert rows[0].baselines == ("last",) and rows[3].baselines == ("middle",)
    assert rows[3].verdict == ""  # 0.65 is far below 0.855
    lines = verdict_lines(_study_with_two_seeds())  # type: ignore[arg-type]
    assert lines[0].startswith("pick: layers 7 (seeds 2)")
    assert any("middle heuristic (layers 3) is worse than the pick" in line for line in lines)


def test_the_table_states_the_horizon_and_method_and_the_plot_draws(tmp_path: Path) -> None:
    from rich.console import Console

    from autolayer.report import candidates_table, plot_contributions, results_json

    study = _study_with_two_seeds()
    console = Console(width=200, record=True)
    console.print(candidates_table(study))  # type: ignore[arg-type]
    text = " ".join(console.export_text().split())  # titles and captions wrap at the table width
    assert "C at the proxy horizon of 30 steps" in text and "training-seed term" in text
    assert "★ best" in text and "last" in text
    assert plot_contributions(study, tmp_path / "c.png") is not None  # type: ignore[arg-type]
    data = results_json(study)  # type: ignore[arg-type]
    assert data["horizon_steps"] == 30 and data["candidates"][0]["layers"] == [7]
    assert len(data["trials"]) == 7


def _legend(study: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from autolayer import report

    shown: list[str] = []

    def keep(fig: Any, path: Path) -> None:
        shown.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())

    monkeypatch.setattr(report, "save_figure", keep)
    report.plot_contributions(study, tmp_path / "c.png")  # type: ignore[arg-type]
    return shown


def test_the_plots_legend_lists_only_the_kinds_of_bar_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study_with_two_seeds()  # layer 7 best, nothing tied with it, layer 2 pruned
    assert _legend(study, tmp_path, monkeypatch) == [
        "best",
        "pruned (value when stopped)",
        "all layers (C = 1)",
    ]
    unpruned = _study_with_two_seeds(pruned=False)
    assert _legend(unpruned, tmp_path, monkeypatch) == ["best", "all layers (C = 1)"]
