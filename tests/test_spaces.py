"""Search spaces: YAML loading, binding to a model, trial <-> candidate, sizes, warm starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from autolayer.errors import AutolayerError
from autolayer.samplers import make_sampler
from autolayer.spaces import (
    Candidate,
    LrRange,
    Space,
    available_spaces,
    bind,
    candidate_from_params,
    grid_size,
    load_space,
    space_size,
    suggest,
    warm_start_params,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _draw(
    space: Space, params: dict[str, Any]
) -> tuple[Candidate | None, optuna.trial.FrozenTrial]:
    """Run `suggest` on a trial whose params are fixed to `params`."""
    study = optuna.create_study()
    study.enqueue_trial(params)
    candidate = suggest(study.ask(), space)
    return candidate, study.trials[-1]


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["single_layer", "window", "subset"])
def test_shipped_spaces_load_by_name_and_name_their_command(name: str) -> None:
    space = load_space(name)
    assert space.kind == name and space.layers is None and space.lr is None
    assert space.description
    first_line = (REPO_SPACES / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# autolayer search ") and f"--space {name}" in first_line


def test_the_package_reads_the_one_copy_of_the_spaces() -> None:
    """No second copy to keep in step: the package links to search_spaces/, a wheel ships it."""
    import tomllib

    from autolayer.spaces import space_dirs

    root = REPO_SPACES.parent
    link = root / "autolayer" / "search_spaces"
    assert link.is_symlink() and link.resolve() == REPO_SPACES.resolve()
    assert [d.resolve() for d in space_dirs()] == [REPO_SPACES.resolve()]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "search_spaces/*.yaml" in data["package-data"]["autolayer"]


def test_a_space_loads_from_a_path_with_lr_choices_and_ranges(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("kind: window\nlayers: [2, 9]\nmax_width: 2\nlr: [1e-3, 3.0e-3]\n")
    # `1e-3` is a string to PyYAML; it is accepted as the number it means.
    assert load_space(str(path)) == Space("window", (2, 9), max_width=2, lr=(1e-3, 3e-3))
    path.write_text("kind: single_layer\nlr: {low: 1.0e-4, high: 1.0e-2}\n")
    assert load_space(str(path)).lr == LrRange(1e-4, 1e-2, log=True)
    assert load_space("mine", spaces_dir=tmp_path).lr == LrRange(1e-4, 1e-2)


def test_an_unknown_name_lists_the_available_spaces() -> None:
    assert {"single_layer", "window", "subset"} <= set(available_spaces())
    with pytest.raises(AutolayerError, match=r"unknown search space 'wide'; available: .*window"):
        load_space("wide")
    with pytest.raises(AutolayerError, match="search space file nope/x.yaml does not exist"):
        load_space("nope/x.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: single_layer\nlayerz: [1, 2]\n", "unknown key 'layerz'; valid keys: description"),
        ("kind: single_layer\nmax_width: 3\n", "key 'max_width' applies only to window spaces"),
        ("kind: stack\n", "key 'kind' must be one of single_layer, window, subset, got 'stack'"),
        ("layers: [1, 2]\n", "key 'kind' must be one of"),
        ("kind: window\nlayers: [5, 2]\n", r"key 'layers' needs 0 <= lo <= hi, got \[5, 2\]"),
        ("kind: window\nlayers: 3\n", r"key 'layers' must be null or a list \[lo, hi\], got 3"),
        ("kind: window\nmin_width: 3\nmax_width: 2\n", r"'max_width' \(2\) must be at least min_"),
        ("kind: window\nmax_width: two\n", "key 'max_width' must be an integer, got 'two'"),
        ("kind: subset\nmax_layers: 0\n", "key 'max_layers' must be at least 1, got 0"),
        ("kind: window\nstride: 2\n", "key 'stride' applies only to single_layer spaces"),
        ("kind: single_layer\nstride: 0\n", "key 'stride' must be at least 1, got 0"),
        ("kind: subset\nlr: [0.001, 0.001]\n", "key 'lr' choices must be distinct positive"),
        ("kind: subset\nlr: {low: 0.01, high: 0.001}\n", "key 'lr' needs 0 < low < high"),
        ("kind: subset\nlr: {low: 0.001}\n", "key 'lr' as a range needs both low and high"),
        ("kind: subset\nlr: {low: 0.001, high: 0.01, step: 2}\n", "unknown key 'lr.step'"),
        ("kind: subset\nlr: fast\n", "key 'lr' must be null, a list of choices or a mapping"),
        ("- kind: subset\n", "a search space must be a YAML mapping"),
        ("kind: [subset\n", "is not valid YAML at line"),
    ],
)
def test_bad_space_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AutolayerError, match=message) as info:
        load_space(str(path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- binding


def test_bind_resolves_the_whole_stack_and_narrows_wide_windows() -> None:
    assert bind(Space("single_layer"), 8).layers == (0, 7)
    assert bind(Space("window", (5, 7), max_width=4), 8).max_width == 3
    assert bind(Space("subset", (0, 1), max_layers=3), 8).max_layers == 2
    with pytest.raises(AutolayerError, match=r"layers \[2, 9\] do not fit.*valid layers are 0..7"):
        bind(Space("single_layer", (2, 9)), 8)
    with pytest.raises(
        AutolayerError, match="min_width 3 is wider than the 2 eligible layers 6..7"
    ):
        bind(Space("window", (6, 7), min_width=3), 8)


# ---------------------------------------------------------------- suggest and its inverse


def test_single_layer_is_an_ordered_integer() -> None:
    candidate, trial = _draw(bind(Space("single_layer", (2, 6)), 8), {"layer": 5})
    assert candidate == Candidate((5,), None)
    assert trial.distributions == {"layer": IntDistribution(2, 6)}


def test_a_stride_keeps_every_kth_layer_from_the_lowest() -> None:
    space = bind(Space("single_layer", (1, 30), stride=4), 32)
    assert space.layers == (1, 29)  # 30 is off the grid 1, 5, ..., 29: Optuna's step would warn
    assert space.eligible == list(range(1, 30, 4)) and space_size(space) == 8
    candidate, trial = _draw(space, {"layer": 9})
    assert candidate == Candidate((9,), None)
    assert trial.distributions == {"layer": IntDistribution(1, 29, step=4)}
    seen = []

    def objective(trial: optuna.Trial) -> float:
        drawn = suggest(trial, space)
        assert drawn is not None
        seen.append(drawn.layers[0])
        return 0.0

    study = optuna.create_study(sampler=make_sampler("auto", space, seed=0))
    study.optimize(objective, n_trials=50)  # the grid stops the study once it is walked
    assert sorted(seen) == space.eligible
    assert warm_start_params(Space("single_layer", stride=2), None, 30, None) == [
        {"layer": 14}
    ]  # the middle of 0, 2, ..., 28, not layer 15 (off the grid)
    assert warm_start_params(Space("single_layer", stride=2), None, 32, None) == [
        {"layer": 14}, {"layer": 16},
    ]  # fmt: skip
    with pytest.raises(AutolayerError, match="key 'stride' applies only to single_layer spaces"):
        Space("window", stride=2)
    with pytest.raises(AutolayerError, match=r"layers \[3\] are not on the space's stride 2"):
        warm_start_params(Space("single_layer", stride=2), [4, 3], 8, None)


def test_window_draws_width_then_a_start_where_it_fits() -> None:
    candidate, trial = _draw(bind(Space("window", max_width=3), 8), {"width": 2, "start": 6})
    assert candidate == Candidate((6, 7), None)
    assert trial.distributions == {"width": IntDistribution(1, 3), "start": IntDistribution(0, 6)}


def test_subset_is_one_boolean_per_layer_with_two_constraints() -> None:
    space = bind(Space("subset", (0, 4), max_layers=2), 8)
    params = {f"layer_{i}": i in (1, 4) for i in range(5)}
    candidate, trial = _draw(space, params)
    assert candidate == Candidate((1, 4), None)
    assert trial.distributions["layer_0"] == CategoricalDistribution([False, True])
    assert trial.constraints == {"max_layers": 0, "min_layers": -1}  # feasible: all <= 0

    none, trial = _draw(space, {f"layer_{i}": False for i in range(5)})
    assert none is None and trial.constraints == {"max_layers": -2, "min_layers": 1}
    too_many, trial = _draw(space, {f"layer_{i}": i < 3 for i in range(5)})
    assert too_many is None and trial.constraints == {"max_layers": 1, "min_layers": -2}
    assert "lr" not in trial.params


def test_lr_is_a_log_range_or_a_choice() -> None:
    ranged = bind(Space("single_layer", lr=LrRange(1e-4, 1e-2)), 4)
    candidate, trial = _draw(ranged, {"layer": 1, "lr": 2e-3})
    assert candidate == Candidate((1,), 2e-3)
    assert trial.distributions["lr"] == FloatDistribution(1e-4, 1e-2, log=True)

    choices = bind(Space("subset", lr=(1e-3, 3e-3)), 4)
    candidate, trial = _draw(
        choices,
        {"layer_0": False, "layer_1": False, "layer_2": False, "layer_3": False, "lr": 3e-3},
    )
    assert candidate is None  # infeasible, but lr is still drawn: the space stays the same
    assert trial.distributions["lr"] == CategoricalDistribution([1e-3, 3e-3])


@pytest.mark.parametrize(
    "space",
    [
        Space("single_layer", lr=(1e-3, 3e-3)),
        Space("window", (1, 4), min_width=1, max_width=3),
        Space("subset", max_layers=2, lr=(1e-3,)),
    ],
)
def test_candidate_from_params_inverts_suggest_over_the_whole_grid(space: Space) -> None:
    space = bind(space, 5)
    drawn: dict[int, Candidate | None] = {}

    def objective(trial: optuna.Trial) -> float:
        drawn[trial.number] = suggest(trial, space)
        return 0.0

    study = optuna.create_study(sampler=make_sampler("grid", space, seed=0))
    study.optimize(objective, n_trials=100)
    assert len(study.trials) == grid_size(space)
    feasible = {n: c for n, c in drawn.items() if c is not None}
    assert len(set(feasible.values())) == space_size(space)
    for trial in study.trials:
        if trial.number in feasible:
            assert candidate_from_params(trial.params, space) == feasible[trial.number]


def test_params_of_another_space_are_an_error() -> None:
    with pytest.raises(AutolayerError, match="do not belong to a window space"):
        candidate_from_params({"layer": 3}, Space("window"))
    assert candidate_from_params({"layer_2": True, "layer_3": False}, Space("subset")).layers == (
        2,
    )


# ---------------------------------------------------------------- sizes


def test_space_and_grid_sizes() -> None:
    assert space_size(bind(Space("single_layer"), 8)) == 8
    assert space_size(bind(Space("window", min_width=1, max_width=2), 4)) == 4 + 3
    assert space_size(bind(Space("window", (2, 5), min_width=2, max_width=3), 8)) == 3 + 2
    subset = bind(Space("subset", (0, 3), max_layers=2, lr=(1e-3, 3e-3, 1e-2)), 8)
    assert space_size(subset) == (4 + 6) * 3  # C(4,1) + C(4,2) layer sets, 3 lrs each
    assert grid_size(subset) == 2**4 * 3  # the grid walks every yes/no vector
    assert space_size(bind(Space("single_layer", lr=LrRange(1e-4, 1e-2)), 8)) is None
    assert grid_size(bind(Space("subset", lr=LrRange(1e-4, 1e-2)), 8)) is None


# ---------------------------------------------------------------- warm starts


@pytest.mark.parametrize(
    ("space", "num_layers", "expected"),
    [
        (Space("single_layer"), 8, [{"layer": 3}, {"layer": 4}]),  # both middle layers of 8
        (Space("single_layer"), 7, [{"layer": 3}]),
        (Space("single_layer", (10, 20)), 28, [{"layer": 15}]),  # middle of the eligible layers
        (Space("window"), 8, [{"width": 2, "start": 3}]),  # Mid-2: layers 3, 4
        (Space("window", min_width=3), 8, [{"width": 3, "start": 2}]),
        (Space("window", max_width=1), 8, [{"width": 1, "start": 3}]),
        (
            Space("subset", (0, 3)),
            8,
            [{"layer_0": False, "layer_1": True, "layer_2": False, "layer_3": False}],
        ),
    ],
)
def test_default_warm_start_is_the_middle(
    space: Space, num_layers: int, expected: list[dict[str, Any]]
) -> None:
    assert warm_start_params(space, None, num_layers, lr=None) == expected


def test_named_warm_start_layers_and_lr() -> None:
    # single_layer keeps the given order: "try these first" is a ranking
    assert warm_start_params(Space("single_layer"), [6, 2], 8, None) == [{"layer": 6}, {"layer": 2}]
    assert warm_start_params(Space("window"), [3, 4, 5], 8, None) == [{"width": 3, "start": 3}]
    choices = Space("single_layer", lr=(1e-3, 3e-3, 1e-2))
    assert warm_start_params(choices, [1], 8, lr=1e-2) == [{"layer": 1, "lr": 1e-2}]
    assert warm_start_params(choices, [1], 8, lr=5e-3) == [{"layer": 1, "lr": 3e-3}]  # middle
    ranged = Space("single_layer", lr=LrRange(1e-4, 1e-2))
    assert warm_start_params(ranged, [1], 8, lr=5e-3) == [{"layer": 1, "lr": 5e-3}]
    (params,) = warm_start_params(ranged, [1], 8, lr=None)
    assert math.isclose(params["lr"], 1e-3)  # the geometric middle of the range


@pytest.mark.parametrize(
    ("space", "layers", "message"),
    [
        (Space("single_layer"), [8], "layer 8 is out of range; valid layers are 0..7"),
        (Space("single_layer", (2, 5)), [1], r"warm-start layers \[1\] are outside .* 2..5"),
        (Space("window", max_width=2), [2, 4], "not one contiguous window of width 1..2"),
        (Space("window", max_width=2), [2, 3, 4], "not one contiguous window of width 1..2"),
        (Space("subset", max_layers=2), [1, 2, 3], "allows at most 2"),
    ],
)
def test_named_warm_start_layers_must_fit(space: Space, layers: list[int], message: str) -> None:
    with pytest.raises(AutolayerError, match=message):
        warm_start_params(space, layers, 8, None)


def test_an_enqueued_warm_start_is_the_first_candidate() -> None:
    space = Space("window", lr=(1e-3, 3e-3))
    study = optuna.create_study()
    for params in warm_start_params(space, None, 8, lr=1e-3):
        study.enqueue_trial(params, skip_if_exists=True)
    assert suggest(study.ask(), bind(space, 8)) == Candidate((3, 4), 1e-3)
