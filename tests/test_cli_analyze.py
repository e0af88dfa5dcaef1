"""`autolayer analyze` on a trained copy and on a delta of the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autolayer.cli import main
from autolayer.delta import save_delta
from autolayer.models import load_model

TOUCHED = "model.layers.3.self_attn.q_proj.weight"  # 64 x 64 = 4,096 entries, 10 of them moved


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("analyze")
    base, _ = load_model("organism", dtype="float32", device="cpu")
    model, tokenizer = load_model("organism", dtype="float32", device="cpu")
    with torch.no_grad():
        model.get_parameter(TOUCHED).view(-1)[:10] += 0.5
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_delta(model, [3], root / "delta", "organism", None, base_model_for_hash=base)
    return root / "model", root / "delta"


def analyze(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["analyze", "--base", "organism", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_trained_copy_reports_exactly_what_moved(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    result = analyze(capsys, "--trained", str(trained[0]), "--out", str(tmp_path))
    [row] = result["matrices"]  # only the changed parameter
    assert row["name"] == TOUCHED and row["layer"] == 3
    assert row["sparsity_abs"] == pytest.approx(1 - 10 / 4096)
    assert row["sparsity_rel"] == pytest.approx(1 - 10 / 4096)  # +0.5 survives bf16
    assert row["bf16_dropped"] == 0.0 and row["mask_chance"] == 0.05
    assert result["layers"] == [
        {"layer": 3, "params": 4096, "sparsity_abs": pytest.approx(1 - 10 / 4096),
         "sparsity_rel": pytest.approx(1 - 10 / 4096), "max_relative_norm": row["relative_norm"]}
    ]  # fmt: skip
    assert (tmp_path / "analysis.json").is_file() and (tmp_path / "analysis.png").is_file()


def test_a_delta_and_a_comparison_of_two_runs(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, delta_dir = trained
    result = analyze(capsys, "--delta", str(delta_dir), "--other", str(model_dir))
    names = {r["name"] for r in result["matrices"]}
    assert TOUCHED in names and all(n.startswith("model.layers.3.") for n in names)
    untouched = [r for r in result["matrices"] if r["name"] != TOUCHED]
    assert untouched and all(r["sparsity_abs"] == 1.0 for r in untouched)
    assert result["runs"]["o1"] == result["runs"]["o2"] == result["runs"]["jaccard"] == 1.0


def test_a_delta_for_another_base_is_one_sentence(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import save_organism_shaped

    other = save_organism_shaped(tmp_path / "other", seed=3)
    code = main(["analyze", "--base", str(other), "--delta", str(trained[1])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "differs from the base the delta was trained from" in err[0]
