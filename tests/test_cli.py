"""The CLI: input errors come before any model library loads, as one sentence with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROBE = (
    "import sys; from autolayer.cli import main; code = main(sys.argv[1:]); "
    "heavy = [m for m in ('torch', 'transformers', 'datasets', 'lightning') if m in sys.modules]; "
    "print('HEAVY', heavy); sys.exit(code)"
)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("config", "space", "message"),
    [
        ({"proxy": {"stepz": 3}}, None, "unknown config key 'proxy.stepz'"),
        ({"search": {"study_name": "../x"}}, None, "study_name must be a plain name"),
        ({}, {"kind": "single_layer", "layers": [3, 12]}, "do not fit the model; valid layers"),
        ({}, {"kind": "nope"}, "kind"),
    ],
)
def test_input_errors_come_before_any_model_library_loads(
    tmp_path: Path, config: dict, space: dict | None, message: str
) -> None:
    if space is not None:
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        config = {**config, "search": {"space": str(tmp_path / "space.yaml")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = run("search", "--config", "c.yaml", "--root", "mlruns", "--no-tracking", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("autolayer: error:") and message in done.stderr
    assert "HEAVY []" in done.stdout  # no torch, transformers, datasets or lightning yet
