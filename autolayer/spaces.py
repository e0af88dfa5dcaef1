"""Search spaces: which layers (and lr) a study may try, and how a trial draws a candidate.

A space is data (`search_spaces/<name>.yaml`); `suggest` turns an Optuna trial into a `Candidate`,
and `candidate_from_params` reads one back from a stored trial. Three kinds:

- `single_layer`: one layer, an ordered integer `layer` (neighbouring layers behave alike, so TPE/GP
  get a useful distance; a categorical would hide it). `stride: k` keeps every k-th layer from the
  lowest (Optuna's integer `step`): a deep model's first scan at a fraction of the trials.
- `window`: a contiguous block, `width` then `start` (the range of `start` depends on `width`).
- `subset`: any set of at most `max_layers` layers, one boolean `layer_<i>` per eligible layer and
  two constraints (`set_constraint`) that make selections of 0 or more than `max_layers` infeasible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import optuna

from autolayer.config import read_yaml
from autolayer.errors import AutolayerError
from autolayer.layers import middle_layers, validate_layers

SpaceKind = Literal["single_layer", "window", "subset"]
KINDS: tuple[str, ...] = get_args(SpaceKind)

# `search_spaces/` at the repository root is the one copy of the built-in spaces: data that users
# read, copy and edit next to their configs. The package reaches it through a link,
# `autolayer/search_spaces -> ../search_spaces`, which a wheel replaces with the files.
_SPACES = Path(__file__).resolve().parent / "search_spaces"

_COMMON_KEYS = {"kind", "layers", "lr", "description"}
_KIND_KEYS = {
    "single_layer": {"stride"},
    "window": {"min_width", "max_width"},
    "subset": {"max_layers"},
}


@dataclass(frozen=True)
class LrRange:
    """A continuous learning-rate range, searched by TPE/GP (not by the exhaustive grid)."""

    low: float
    high: float
    log: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise AutolayerError(
                f"key 'lr' needs 0 < low < high, got low={self.low} and high={self.high}"
            )

    @property
    def middle(self) -> float:
        """The geometric middle on a log scale, else the arithmetic one."""
        if self.log:
            return math.sqrt(self.low * self.high)
        return (self.low + self.high) / 2


LrSpec = LrRange | tuple[float, ...] | None


@dataclass(frozen=True)
class Space:
    """What a study searches over. `layers` are inclusive bounds; None means the whole stack."""

    kind: SpaceKind
    layers: tuple[int, int] | None = None
    min_width: int = 1  # window only
    max_width: int = 4  # window only
    max_layers: int = 3  # subset only: at most this many layers (at least 1)
    stride: int = 1  # single_layer only: every `stride`-th layer from the lowest eligible one
    lr: LrSpec = None  # None: every trial uses the fixed proxy.lr
    description: str = ""

    def __post_init__(self) -> None:
        _require(
            self.kind in KINDS, f"key 'kind' must be one of {', '.join(KINDS)}, got {self.kind!r}"
        )
        if self.layers is not None:
            lo, hi = self.layers
            _require(0 <= lo <= hi, f"key 'layers' needs 0 <= lo <= hi, got [{lo}, {hi}]")
        _require(self.min_width >= 1, f"key 'min_width' must be at least 1, got {self.min_width}")
        _require(
            self.max_width >= self.min_width,
            f"key 'max_width' ({self.max_width}) must be at least min_width ({self.min_width})",
        )
        _require(
            self.max_layers >= 1, f"key 'max_layers' must be at least 1, got {self.max_layers}"
        )
        _require(self.stride >= 1, f"key 'stride' must be at least 1, got {self.stride}")
        _require(
            self.stride == 1 or self.kind == "single_layer",
            f"key 'stride' applies only to single_layer spaces, not {self.kind}",
        )
        if isinstance(self.lr, tuple):
            _require(
                len(self.lr) > 0
                and all(v > 0 for v in self.lr)
                and len(set(self.lr)) == len(self.lr),
                f"key 'lr' choices must be distinct positive numbers, got {list(self.lr)}",
            )

    @property
    def bounds(self) -> tuple[int, int]:
        """The eligible layers `(lo, hi)` of a bound space."""
        if self.layers is None:
            raise ValueError("bind the space to a model with bind() before using its layers")
        return self.layers

    @property
    def eligible(self) -> list[int]:
        """The layers a bound space's trials may train, lowest first."""
        lo, hi = self.bounds
        return list(range(lo, hi + 1, self.stride))


@dataclass(frozen=True)
class Candidate:
    """One point of a space: the layers to train and the learning rate (None: proxy.lr)."""

    layers: tuple[int, ...]
    lr: float | None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AutolayerError(message)


# ---------------------------------------------------------------- loading


def space_dirs() -> list[Path]:
    """Where space names are looked up."""
    return [_SPACES] if _SPACES.is_dir() else []


def available_spaces(spaces_dir: Path | None = None) -> list[str]:
    dirs = [spaces_dir] if spaces_dir is not None else space_dirs()
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def _find_space_file(name_or_path: str, spaces_dir: Path | None) -> Path:
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise AutolayerError(f"search space file {path} does not exist")
        return path
    dirs = [spaces_dir] if spaces_dir is not None else space_dirs()
    for directory in dirs:
        path = directory / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    names = ", ".join(available_spaces(spaces_dir)) or "none found"
    raise AutolayerError(
        f"unknown search space {name_or_path!r}; available: {names} (or give a path to a YAML file)"
    )


def load_space(name_or_path: str, spaces_dir: Path | None = None) -> Space:
    """Read a space by name (`search_spaces/<name>.yaml`) or path; errors name the file and key."""
    path = _find_space_file(name_or_path, spaces_dir)
    data = read_yaml(path, "search space")
    try:
        return space_from_dict(data)
    except AutolayerError as err:
        raise AutolayerError(f"search space {path}: {err}") from None


def space_from_dict(data: Any) -> Space:
    """Build a Space from parsed YAML, checking keys and types."""
    _require(isinstance(data, dict), "a search space must be a YAML mapping of keys")
    kind = data.get("kind")
    _require(kind in KINDS, f"key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    for key in data:
        if key in allowed:
            continue
        owner = next((k for k, keys in _KIND_KEYS.items() if key in keys), None)
        if owner is not None:
            raise AutolayerError(f"key {key!r} applies only to {owner} spaces, not {kind}")
        raise AutolayerError(f"unknown key {key!r}; valid keys: {', '.join(sorted(allowed))}")
    kwargs: dict[str, Any] = {"kind": kind, "layers": _read_layers(data.get("layers"))}
    for key in _KIND_KEYS[kind]:
        if key in data:
            kwargs[key] = _read_int(data[key], key)
    kwargs["lr"] = _read_lr(data.get("lr"))
    description = data.get("description", "")
    _require(
        isinstance(description, str), f"key 'description' must be a string, got {description!r}"
    )
    kwargs["description"] = description.strip()
    return Space(**kwargs)


def _read_int(value: Any, key: str) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool),
        f"key {key!r} must be an integer, got {value!r}",
    )
    return int(value)


def _read_layers(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    _require(
        isinstance(value, list) and len(value) == 2,
        f"key 'layers' must be null or a list [lo, hi], got {value!r}",
    )
    return _read_int(value[0], "layers"), _read_int(value[1], "layers")


def _read_float(value: Any, key: str) -> float:
    # PyYAML reads `1e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"key {key!r} must be a number, got {value!r}",
    )
    return float(value)


def _read_lr(value: Any) -> LrSpec:
    if value is None:
        return None
    if isinstance(value, list):
        return tuple(_read_float(v, "lr") for v in value)
    if isinstance(value, dict):
        for key in value:
            _require(key in ("low", "high", "log"), f"unknown key 'lr.{key}'; use low, high, log")
        _require("low" in value and "high" in value, "key 'lr' as a range needs both low and high")
        log = value.get("log", True)
        _require(isinstance(log, bool), f"key 'lr.log' must be true/false, got {log!r}")
        return LrRange(
            _read_float(value["low"], "lr.low"), _read_float(value["high"], "lr.high"), log
        )
    raise AutolayerError(
        f"key 'lr' must be null, a list of choices or a mapping {{low, high, log}}, got {value!r}"
    )


# ---------------------------------------------------------------- binding to a model


def bind(space: Space, num_layers: int) -> Space:
    """Resolve `layers: null` to the whole stack and check the bounds against the model.

    A window or subset wider than the eligible layers is narrowed to them, so one YAML serves
    models of any depth; a `min_width` that cannot fit is an error.
    """
    lo, hi = space.layers if space.layers is not None else (0, num_layers - 1)
    if hi >= num_layers:
        raise AutolayerError(
            f"search space layers [{lo}, {hi}] do not fit the model; valid layers are "
            f"0..{num_layers - 1}"
        )
    hi -= (hi - lo) % space.stride  # the highest layer on the stride's grid, as Optuna's step
    count = hi - lo + 1
    if space.kind == "window" and space.min_width > count:
        raise AutolayerError(
            f"window min_width {space.min_width} is wider than the {count} eligible layers "
            f"{lo}..{hi}"
        )
    return replace(
        space,
        layers=(lo, hi),
        max_width=min(space.max_width, count),
        max_layers=min(space.max_layers, count),
    )


# ---------------------------------------------------------------- trials


def suggest(trial: optuna.Trial, space: Space) -> Candidate | None:
    """Draw a candidate from a bound space; None when a subset trial is infeasible.

    An infeasible trial should be told as COMPLETE with a neutral value and no training: its
    constraints (not its value) make samplers and `study.best_trial` treat it as infeasible.
    """
    lo, hi = space.bounds
    if space.kind == "single_layer":
        layers: tuple[int, ...] = (trial.suggest_int("layer", lo, hi, step=space.stride),)
    elif space.kind == "window":
        width = trial.suggest_int("width", space.min_width, space.max_width)
        start = trial.suggest_int("start", lo, hi - width + 1)
        layers = tuple(range(start, start + width))
    else:
        layers = tuple(
            i for i in range(lo, hi + 1) if trial.suggest_categorical(f"layer_{i}", [False, True])
        )
        # Feasible when every constraint value is <= 0 (Optuna's convention).
        trial.set_constraint("max_layers", len(layers) - space.max_layers)
        trial.set_constraint("min_layers", 1 - len(layers))
    lr = _suggest_lr(trial, space.lr)  # drawn for infeasible trials too: the space stays static
    if space.kind == "subset" and not 1 <= len(layers) <= space.max_layers:
        return None
    return Candidate(layers, lr)


def _suggest_lr(trial: optuna.Trial, lr: LrSpec) -> float | None:
    if isinstance(lr, LrRange):
        return trial.suggest_float("lr", lr.low, lr.high, log=lr.log)
    if isinstance(lr, tuple):
        return float(trial.suggest_categorical("lr", list(lr)))
    return None


def candidate_from_params(params: dict[str, Any], space: Space) -> Candidate:
    """Read a stored trial's params back into a Candidate (the inverse of `suggest`).

    Subset params are read as they are: an infeasible trial gives 0 or too many layers.
    """
    try:
        if space.kind == "single_layer":
            layers: tuple[int, ...] = (int(params["layer"]),)
        elif space.kind == "window":
            start = int(params["start"])
            layers = tuple(range(start, start + int(params["width"])))
        else:
            keys = [k for k in params if k.startswith("layer_")]
            if not keys:
                raise KeyError("layer_<i>")
            layers = tuple(sorted(int(k.removeprefix("layer_")) for k in keys if params[k]))
    except (KeyError, ValueError):
        raise AutolayerError(
            f"trial params {params} do not belong to a {space.kind} space; was the study run "
            "with another search space?"
        ) from None
    lr = params.get("lr")
    return Candidate(layers, None if lr is None else float(lr))


# ---------------------------------------------------------------- sizes


def _lr_factor(lr: LrSpec) -> int | None:
    if isinstance(lr, LrRange):
        return None
    return len(lr) if isinstance(lr, tuple) else 1


def space_size(space: Space) -> int | None:
    """Distinct feasible candidates of a bound space; None when lr is a continuous range."""
    factor = _lr_factor(space.lr)
    if factor is None:
        return None
    lo, hi = space.bounds
    count = hi - lo + 1
    if space.kind == "single_layer":
        size = len(space.eligible)
    elif space.kind == "window":
        size = sum(count - w + 1 for w in range(space.min_width, space.max_width + 1))
    else:
        size = sum(math.comb(count, k) for k in range(1, space.max_layers + 1))
    return size * factor


def grid_size(space: Space) -> int | None:
    """Parameter points an exhaustive sampler walks; for subset every boolean vector counts,
    infeasible ones included (they cost no training, but they are trials)."""
    factor = _lr_factor(space.lr)
    if factor is None:
        return None
    if space.kind != "subset":
        return space_size(space)
    lo, hi = space.bounds
    return int(2 ** (hi - lo + 1)) * factor


# ---------------------------------------------------------------- warm starts


def warm_start_params(
    space: Space, layers: Sequence[int] | None, num_layers: int, lr: float | None
) -> list[dict[str, Any]]:
    """Params for `study.enqueue_trial(..., skip_if_exists=True)`: the first trials to run.

    `layers` None starts in the middle of the eligible layers, where high-contribution layers sit
    (arXiv 2607.01232): single_layer enqueues the middle layer of an odd count and both middle
    layers of an even count (neither side is favoured, for one extra trial); window a centred
    window of width 2 (the paper's Mid-2) clamped to [min_width, max_width]; subset the middle
    layer alone.
    Named layers are checked against the model and the space; single_layer enqueues each one,
    in the order given (the search tries them in that order).
    The lr is `lr` when the space allows it, else the middle choice (or the middle of the range).
    """
    space = bind(space, num_layers)
    if layers is None:
        chosen = _middle_selection(space)
    else:
        chosen = validate_layers(layers, num_layers)
        _check_in_space(chosen, space)
    if space.kind == "single_layer" and layers is not None:
        chosen = tuple(int(layer) for layer in layers)  # validated above; keep the given order
    groups = [(layer,) for layer in chosen] if space.kind == "single_layer" else [chosen]
    lr_param = _warm_lr(space.lr, lr)
    return [{**_layer_params(group, space), **lr_param} for group in groups]


def _middle_selection(space: Space) -> tuple[int, ...]:
    eligible = space.eligible
    count = len(eligible)
    if space.kind == "single_layer":
        width = 1 if count % 2 else 2
    elif space.kind == "window":
        width = min(max(2, space.min_width), space.max_width)
    else:
        width = 1
    return tuple(eligible[i] for i in middle_layers(count, width))


def _check_in_space(chosen: tuple[int, ...], space: Space) -> None:
    lo, hi = space.bounds
    outside = [layer for layer in chosen if not lo <= layer <= hi]
    _require(
        not outside, f"warm-start layers {outside} are outside the search space's layers {lo}..{hi}"
    )
    off_grid = [layer for layer in chosen if (layer - lo) % space.stride]
    _require(
        not off_grid,
        f"warm-start layers {off_grid} are not on the space's stride {space.stride} from {lo}",
    )
    if space.kind == "window":
        contiguous = chosen == tuple(range(chosen[0], chosen[0] + len(chosen)))
        _require(
            contiguous and space.min_width <= len(chosen) <= space.max_width,
            f"warm-start layers {list(chosen)} are not one contiguous window of width "
            f"{space.min_width}..{space.max_width}",
        )
    if space.kind == "subset":
        _require(
            len(chosen) <= space.max_layers,
            f"warm start names {len(chosen)} layers but the subset space allows at most "
            f"{space.max_layers}",
        )


def _layer_params(group: tuple[int, ...], space: Space) -> dict[str, Any]:
    if space.kind == "single_layer":
        return {"layer": group[0]}
    if space.kind == "window":
        return {"width": len(group), "start": group[0]}
    lo, hi = space.bounds
    return {f"layer_{i}": i in group for i in range(lo, hi + 1)}


def _warm_lr(spec: LrSpec, lr: float | None) -> dict[str, float]:
    if isinstance(spec, LrRange):
        return {"lr": lr if lr is not None and spec.low <= lr <= spec.high else spec.middle}
    if isinstance(spec, tuple):
        match = next((c for c in spec if lr is not None and math.isclose(c, lr)), None)
        return {"lr": match if match is not None else sorted(spec)[len(spec) // 2]}
    return {}


def baseline_params(space: Space, layers: Sequence[int], lr: float | None) -> dict[str, Any] | None:
    """Params of the candidate `layers` at `lr` in a bound space, or None if the space cannot
    express it (outside the eligible layers, a width it does not allow, more layers than it may)."""
    chosen = tuple(sorted(layers))
    try:
        _check_in_space(chosen, space)
    except AutolayerError:
        return None
    if space.kind == "single_layer" and len(chosen) != 1:
        return None
    lr_param = _warm_lr(space.lr, lr)
    if lr is not None and lr_param and not math.isclose(lr_param["lr"], lr):
        return None  # the pick's lr is not a point of this space
    return {**_layer_params(chosen, space), **lr_param}
