"""`autolayer train`, `export` and `merge`: user mistakes are one line and exit 2; files land."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import create_trial
from transformers import AutoModelForCausalLM

from autolayer.cli import build_parser, main
from autolayer.delta import save_delta
from autolayer.export import FILENAMES
from autolayer.layers import ORGANISM
from autolayer.models import load_model
from autolayer.storage import make_storage
from autolayer.study import trial_fields, write_study
from tests.conftest import save_organism_shaped

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def model_name() -> str:
    return ORGANISM


@pytest.fixture
def config_file(tmp_path: Path, model_name: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model:\n  name: {model_name}\n"
        "task:\n  train_size: 16\n  eval_size: 20\n"
        "proxy:\n  prompts_per_step: 2\n  num_generations: 2\n  device: cpu\n"
        "train:\n  steps: 1\n"
    )
    return path


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """A journal storage holding study `found`: layer 5 best, then layers 2 and 4 together."""
    url = f"journal:{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="found", storage=make_storage(url), direction="maximize")
    write_study(study, reference_base_score=0.4, reference_full_score=0.6)
    for value, layers in [(0.9, [5]), (0.8, [2, 4]), (0.1, [0])]:
        study.add_trial(
            create_trial(
                value=value,
                user_attrs=trial_fields(
                    layers=layers,
                    lr=2e-3,
                    score=0.4 + value / 5,
                    contribution=value,
                    ci_low=value - 0.1,
                    ci_high=value + 0.1,
                ),
            )
        )
    return url


def one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("autolayer: error: ")
    return lines[0]


# ---- train ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "3", "--study-name", "found"], "not both"),
        ([], "say which layers"),
        (["--study-name", "missing"], "no study named 'missing'.*stored studies: found"),
        (["--layers", "99"], r"layer 99 is out of range; valid layers are 0\.\.7"),
        (["--layers", "three"], "cannot read layer selection"),
        (["--strategy", "mid", "--layers", "3"], "picks the middle layers itself"),
        (["--strategy", "best", "--layers", "3"], "'train.strategy' must be one of 'only', 'mid'"),
        (["--study-name", "found", "--top-k", "5"], "only 4 distinct layers"),
        (["--layers", "3", "--steps", "0"], "steps must be >= 1"),
    ],
)
def test_train_user_errors(
    extra: list[str],
    message: str,
    config_file: Path,
    storage: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "train",
            "--config",
            str(config_file),
            "--storage",
            storage,
            "--root",
            str(tmp_path / "root"),
            "--out",
            str(tmp_path / "out"),
            *extra,
        ]
    )
    assert re.search(message, one_error_line(capsys, code))
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_existing_output_dir(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(
        [
            "train",
            "--config",
            str(config_file),
            "--layers",
            "3",
            "--out",
            str(out),
            "--root",
            str(tmp_path / "root"),
            "--no-tracking",
        ]
    )
    assert "--overwrite" in one_error_line(capsys, code)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_train_from_a_study(
    config_file: Path, storage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--config",
            str(config_file),
            "--study-name",
            "found",
            "--storage",
            storage,
            "--root",
            str(tmp_path / "root"),
            "--out",
            str(out),
            "--no-tracking",
        ]
    )
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["layers"] == [5] and summary["study"] == "found" and summary["steps"] == 1
    printed = capsys.readouterr().out
    assert "trained layers 5" in printed and str(out / "model") in printed


# ---- export --------------------------------------------------------------------------------------


def test_export_axolotl_for_explicit_layers(
    model_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exports"
    assert (
        main(
            [
                "export",
                "--format",
                "axolotl",
                "--layers",
                "3",
                "--model",
                model_name,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = (out / FILENAMES["axolotl"]).read_text()
    assert "- ^model.layers.3.\n" in text and "model.layers.4" not in text
    assert capsys.readouterr().out.strip() == str(out / FILENAMES["axolotl"])


def test_export_llamafactory_refuses_a_gap_and_writes_nothing(
    model_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exports"
    code = main(
        [
            "export",
            "--format",
            "llamafactory",
            "--layers",
            "3,5",
            "--model",
            model_name,
            "--out",
            str(out),
        ]
    )
    assert "cannot be expressed in LLaMA-Factory" in one_error_line(capsys, code)
    assert not out.exists() or not any(out.iterdir())


def test_export_all_reports_the_refusal_and_writes_the_rest(
    model_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exports"
    assert (
        main(
            [
                "export",
                "--format",
                "all",
                "--layers",
                "3,5",
                "--model",
                model_name,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = {fmt for fmt, name in FILENAMES.items() if (out / name).is_file()}
    assert written == set(FILENAMES) - {"llamafactory"}
    assert "skipped llamafactory: layers [3, 5] cannot be expressed" in capsys.readouterr().out


def test_export_from_a_study_records_the_evidence(
    model_name: str, storage: str, tmp_path: Path
) -> None:
    out = tmp_path / "exports"
    assert (
        main(
            [
                "export",
                "--format",
                "json",
                "--study-name",
                "found",
                "--top-k",
                "2",
                "--model",
                model_name,
                "--storage",
                storage,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / FILENAMES["json"]).read_text())
    assert record["layers"] == [2, 5]  # 5 (best), then 2 from the trial of layers 2 and 4
    evidence = record["evidence"]
    assert evidence["study"] == "found" and evidence["storage"] == storage
    assert evidence["reference_base_score"] == 0.4 and evidence["reference_full_score"] == 0.6
    assert [t["layers"] for t in evidence["trials"]] == [[5]]  # [2, 4] is not inside {2, 5}
    assert evidence["trials"][0]["contribution"] == 0.9 and evidence["trials"][0]["ci_low"] == 0.8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "yaml", "--layers", "3"], "unknown export format 'yaml'"),
        (["--format", "json"], "say which layers"),
        (["--format", "json", "--layers", "3", "--study-name", "found"], "not both"),
        (["--format", "json", "--layers", "3"], "say which model"),
        (["--format", "json", "--layers", "3", "--model", "/nonexistent/model"], "does not exist"),
    ],
)
def test_export_user_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", *args, "--out", str(tmp_path / "exports"), "--root", str(tmp_path)])
    assert message in one_error_line(capsys, code)


# ---- merge ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two different random bases and a delta of layer 1 taken from the first."""
    root = tmp_path_factory.mktemp("merge")
    base_a, base_b = (
        save_organism_shaped(root / "a", seed=0),
        save_organism_shaped(root / "b", seed=1),
    )
    model, _ = load_model(str(base_a), dtype="float32", device="cpu")
    hashed_base, _ = load_model(str(base_a), dtype="float32", device="cpu")
    with torch.no_grad():
        model.get_parameter("model.layers.1.mlp.down_proj.weight").add_(0.5)  # "training"
    save_delta(model, [1], root / "delta", str(base_a), None, base_model_for_hash=hashed_base)
    return base_a, base_b, root / "delta"


def test_merge_into_the_wrong_base_exits_2(
    two_bases: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, base_b, delta = two_bases
    code = main(
        ["merge", "--base", str(base_b), "--delta", str(delta), "--out", str(tmp_path / "merged")]
    )
    assert "differs from the base the delta was trained from" in one_error_line(capsys, code)
    assert not (tmp_path / "merged").exists()


def test_merge_into_the_right_base(two_bases: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base_a, _, delta = two_bases
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_a),
                "--delta",
                str(delta),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_a)
    assert torch.equal(
        merged.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight + 0.5
    )


# ---- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "export", "merge"])
def test_every_option_is_explained(command: str) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    assert parser.description
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings} has no help"


def test_merge_checks_a_corrupt_delta_before_loading_the_base(
    two_bases: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    import autolayer.delta

    base_a, _, delta = two_bases
    broken = tmp_path / "broken"
    shutil.copytree(delta, broken)
    (broken / "delta.safetensors").write_bytes(b"not a tensor file")

    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the base was loaded before the delta was checked")

    monkeypatch.setattr(autolayer.delta, "load_model", must_not_load)
    code = main(
        ["merge", "--base", str(base_a), "--delta", str(broken), "--out", str(tmp_path / "m")]
    )
    assert "is not a readable safetensors file" in one_error_line(capsys, code)


def test_export_all_that_writes_nothing_exits_2(
    model_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(
        ["export", "--format", "all", "--layers", "3", "--model", model_name,
         "--out", str(blocker / "exports"), "--root", str(tmp_path)]
    )  # fmt: skip
    assert "no export format could be written to" in one_error_line(capsys, code)
