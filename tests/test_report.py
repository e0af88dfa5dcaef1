"""What a person reads: zero-width intervals, plots written whole, study names kept inside root."""

from __future__ import annotations

from pathlib import Path

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
