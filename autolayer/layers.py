"""Layer indices and model names: the pure logic, with no torch import, so a wrong layer, space
or path is caught in about a second, before any model library loads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from autolayer.errors import AutolayerError

ORGANISM = "organism"  # the name of the bundled model wherever a model is accepted
CODE_ORGANISM = "code_organism"  # the bundled code model, likewise
AGENT_ORGANISM = "agent_organism"  # the bundled grid-world agent, likewise
ASSETS = Path(__file__).resolve().parent / "assets"


def validate_layers(layers: Iterable[object], num_layers: int) -> tuple[int, ...]:
    """Check a layer selection and return it sorted; errors name the valid range."""
    selection = list(layers)
    valid = f"valid layers are 0..{num_layers - 1}"
    if not selection:
        raise AutolayerError(f"the layer selection is empty; {valid}")
    for layer in selection:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise AutolayerError(f"layer {layer!r} is not an integer; {valid}")
        if not 0 <= layer < num_layers:
            raise AutolayerError(f"layer {layer} is out of range; {valid}")
    if len(set(selection)) != len(selection):
        dupes = sorted({int(str(x)) for x in selection if selection.count(x) > 1})
        raise AutolayerError(f"layers {dupes} are selected more than once; {valid}")
    return tuple(sorted(selection))  # type: ignore[arg-type]


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Parse a CLI selection like `3,4`, `10-12` or `all` into validated layer indices."""
    text = text.strip()
    if text == "all":
        return tuple(range(num_layers))
    selection: list[object] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, sep, end = part.partition("-")
        try:
            if sep:
                selection.extend(range(int(start), int(end) + 1))
            else:
                selection.append(int(part))
        except ValueError:
            raise AutolayerError(
                f"cannot read layer selection {text!r}; use e.g. '3', '3,7' or '10-12'"
            ) from None
    return validate_layers(selection, num_layers)


def middle_third(num_layers: int) -> range:
    """The middle third of the stack, where the RL-heavy layers usually sit (arXiv 2607.01232)."""
    return range(num_layers // 3, num_layers - num_layers // 3)


def middle_layers(num_layers: int, k: int) -> tuple[int, ...]:
    """Mid-k from the paper: layers [floor(L/2 - k/2), floor(L/2 + k/2))."""
    start = (num_layers - k) // 2
    return tuple(range(start, start + k))


BUNDLED = (ORGANISM, CODE_ORGANISM, AGENT_ORGANISM)  # each in assets/<name>/


def resolve_model_path(name: str) -> str:
    """Map a bundled model's name to its directory; pass hub ids and paths through."""
    if name in BUNDLED:
        return str(ASSETS / name)
    return name


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count_from_config(name: str) -> int | None:
    """The decoder layer count a local model's config.json states, read without loading it
    (None for a hub id or a config that does not say), so a layer range fails in a second."""
    path = Path(resolve_model_path(name)).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for section in (data, data.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(section.get(key), int):
                return int(section[key])
    return None
