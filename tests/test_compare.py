"""Layer-ranking agreement between studies, against hand-worked values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import create_trial

from autolayer.cli import main
from autolayer.compare import (
    NOISE_ALPHA,
    Profile,
    agreement,
    kendall_p,
    noise_p,
    noisiness,
    profile,
    spearman_p,
)
from autolayer.errors import AutolayerError
from autolayer.storage import make_storage
from autolayer.study import trial_fields, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def outcomes(score: float, n: int = 40) -> list[float]:
    """n binary outcomes whose mean is `score` (rounded to 1/n)."""
    ones = round(score * n)
    return [1.0] * ones + [0.0] * (n - ones)


def make_study(storage: object, name: str, scores: dict[int, float], model: str = "m") -> None:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    write_study(study, model=model)
    for layer, score in scores.items():
        attrs = trial_fields(layers=[layer], outcomes=outcomes(score))
        study.add_trial(create_trial(value=score, user_attrs=attrs))


def test_spearman_p_is_exact_for_few_layers() -> None:
    # a perfect ranking of 4 layers: 2 of the 4! = 24 orderings are as extreme (rho = +-1)
    assert spearman_p(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == 2 / 24
    # 8 layers: 2 / 8! = 2 / 40,320
    assert spearman_p(np.arange(8.0), np.arange(8.0)) == pytest.approx(2 / 40320)
    # rho = 1 - 6 * 4 / (4 * 15) = 0.6 for [2, 1, 4, 3]: 10 of 24 orderings have |rho| >= 0.6
    assert spearman_p(np.array([1.0, 2, 3, 4]), np.array([2.0, 1, 4, 3])) == 10 / 24


def test_kendall_p_is_exact_with_ties() -> None:
    # y = [1, 1, 2, 2] against a perfect x: concordant minus discordant pairs S = 4. Its six
    # distinct orderings give S = 4, 2, 0, 0, -2, -4 (each 4 times in 4! = 24): p = 8 / 24.
    # scipy's asymptotic p with ties is 0.121, far below.
    assert kendall_p(np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 2, 2])) == pytest.approx(1 / 3)
    # no ties: 2 of 24 orderings have |tau| = 1
    assert kendall_p(np.array([1.0, 2, 3, 4]), np.array([5.0, 6, 7, 8])) == pytest.approx(2 / 24)
    # 6 layers, ties at a ceiling as in a study where several layers reach 1.000:
    # 16 of the 720 orderings are as extreme (scipy's asymptotic p: 0.017)
    x, y = np.arange(6.0), np.array([0.0, 0, 1, 1, 2, 2])
    assert kendall_p(x, y) == pytest.approx(16 / 720)
    assert kendall_p(x, np.zeros(6)) == 1.0  # a constant profile ranks nothing
    layers = tuple(range(6))
    rising = Profile(
        "rising", "m", layers, np.array([outcomes(s) for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)])
    )
    tied = Profile(
        "tied", "m", layers, np.array([outcomes(s) for s in (0.2, 0.2, 0.5, 0.5, 0.8, 0.8)])
    )
    assert agreement(rising, tied).kendall_p == pytest.approx(16 / 720)


def test_agreement_of_literal_profiles() -> None:
    rng = np.random.default_rng(0)
    up = Profile("up", "m", (0, 1, 2, 3), np.array([outcomes(s) for s in (0.1, 0.4, 0.6, 0.9)]))
    same = Profile("same", "m", (0, 1, 2, 3), np.array([outcomes(s) for s in (0.2, 0.3, 0.7, 0.8)]))
    down = Profile("down", "m", (0, 1, 2, 3), np.array([outcomes(s) for s in (0.9, 0.6, 0.4, 0.1)]))
    a = agreement(up, same)
    assert (a.spearman, a.kendall, a.spearman_p) == (1.0, 1.0, 2 / 24)
    assert a.kendall_p == pytest.approx(2 / 24)  # exact: 2 of 24 orderings have |tau| = 1
    assert a.spearman_ci[1] == 1.0 and a.note == ""
    assert agreement(up, down).spearman == -1.0
    flat = Profile("flat", "m", (0, 1, 2, 3), rng.integers(0, 2, size=(4, 40)).astype(float))
    assert noisiness(flat) < 0.5 and "too noisy to correlate: flat" in agreement(up, flat).note
    assert noisiness(up) > 0.9


def test_the_noise_flag_holds_pure_noise_to_its_stated_rate() -> None:
    """Pure noise ranks its layers about half-alike on two resamples (both share its noise), so
    a bar at stability 0.5 let 37% of pure-noise profiles through. This one, 4 layers of coin
    flips, is stable at 0.74 but no more than shuffled profiles are: flagged."""
    rng = np.random.default_rng(1)
    flat = Profile("flat", "m", (0, 1, 2, 3), rng.integers(0, 2, size=(4, 40)).astype(float))
    assert noisiness(flat) == pytest.approx(0.738, abs=1e-3)
    assert noise_p(flat) == pytest.approx(36 / 201) and noise_p(flat) > NOISE_ALPHA
    up = Profile("up", "m", (0, 1, 2, 3), np.array([outcomes(s) for s in (0.1, 0.4, 0.6, 0.9)]))
    assert noise_p(up) == 1 / 201  # no shuffled profile is as stable: the smallest p it can give
    assert "too noisy to correlate: flat" in agreement(up, flat).note


def test_compare_command_and_its_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"journal:{tmp_path / 'j.log'}"
    storage = make_storage(url)
    make_study(storage, "math", {0: 0.1, 1: 0.5, 2: 0.7, 3: 0.3})
    make_study(storage, "code", {0: 0.2, 1: 0.6, 2: 0.9, 3: 0.4})
    make_study(storage, "other", {0: 0.2, 1: 0.6, 2: 0.9}, model="another")
    make_study(storage, "tiny", {0: 0.2, 1: 0.6})
    args = ["--storage", url, "--root", str(tmp_path), "--no-tracking"]
    assert main(["compare", "math", "code", "--json", *args]) == 0
    [pair] = json.loads(capsys.readouterr().out)["pairs"]
    assert (pair["first"], pair["second"], pair["layers"], pair["spearman"]) == (
        "math",
        "code",
        4,
        1.0,
    )
    assert (tmp_path / "compare" / "compare_heatmap.png").is_file()
    assert (tmp_path / "compare" / "compare_profiles.png").is_file()
    for study, message in [("other", "different models"), ("tiny", "at least 3")]:
        assert main(["compare", "math", study, *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(AutolayerError, match="at least 3"):
        profile(optuna.load_study(study_name="tiny", storage=storage))
