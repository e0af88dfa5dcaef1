import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from autolayer.delta import (
    DELTA_FILE,
    MANIFEST_FILE,
    hash_parameters,
    load_delta,
    merge_delta,
    merge_to_dir,
    save_delta,
)
from autolayer.errors import AutolayerError
from autolayer.models import layer_param_names
from autolayer.organism import build_tokenizer
from tests.conftest import tiny_qwen3

LAYERS = (1, 3)


def qwen3(seed: int, num_layers: int = 4) -> tf.PreTrainedModel:
    return tiny_qwen3(num_layers, seed, vocab_size=20)


def perturb(model: torch.nn.Module, layers: tuple[int, ...]) -> None:
    """Stand-in for training: add noise to every parameter of `layers`, in place."""
    generator = torch.Generator().manual_seed(123)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in layer_param_names(model, layers):
            params[name].add_(torch.randn(params[name].shape, generator=generator))


@pytest.fixture
def trained(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A model trained on LAYERS from base seed 0, and its delta (base hashed before training)."""
    model = qwen3(seed=0)
    base_hashes = hash_parameters(model, layer_param_names(model, LAYERS))
    perturb(model, LAYERS)
    delta = save_delta(
        model, LAYERS, tmp_path / "delta", "tiny/qwen3", "rev1", base_hashes=base_hashes
    )
    return model, delta


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_delta_holds_only_the_chosen_layers_with_a_manifest(trained) -> None:
    model, delta = trained
    names = layer_param_names(model, LAYERS)
    assert set(load_file(str(delta / DELTA_FILE))) == set(names)
    manifest = json.loads((delta / MANIFEST_FILE).read_text())
    assert manifest["base_model"] == "tiny/qwen3" and manifest["base_revision"] == "rev1"
    assert manifest["stack_path"] == "model.layers" and manifest["num_layers"] == 4
    assert manifest["layers"] == [1, 3] and manifest["dtype"] == "float32"
    assert [e["name"] for e in manifest["parameters"]] == names
    entry = manifest["parameters"][0]
    assert entry["shape"] == list(dict(model.named_parameters())[entry["name"]].shape)
    assert entry["sha256"] != entry["base_sha256"]  # training changed it
    assert not list(delta.parent.glob(".delta.*"))  # no temporary directory left behind


def test_merge_into_a_fresh_base_is_bit_identical(trained) -> None:
    model, delta = trained
    merged = merge_delta(qwen3(seed=0), delta)
    assert_same_parameters(merged, model)


def test_base_hashes_from_a_base_model_equal_precomputed_ones(trained, tmp_path) -> None:
    model, delta = trained
    again = save_delta(
        model, LAYERS, tmp_path / "again", "tiny/qwen3", "rev1", base_model_for_hash=qwen3(seed=0)
    )
    assert (again / MANIFEST_FILE).read_text() == (delta / MANIFEST_FILE).read_text()
    with pytest.raises(ValueError, match="exactly one"):
        save_delta(model, LAYERS, tmp_path / "x", "tiny/qwen3", None)


def test_merge_to_dir_round_trips_through_save_pretrained(trained, tmp_path) -> None:
    model, delta = trained
    base_dir = tmp_path / "base"
    qwen3(seed=0).save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    out = merge_to_dir(str(base_dir), delta, tmp_path / "merged")
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert_same_parameters(reloaded, model)
    with pytest.raises(AutolayerError, match="already exists"):
        merge_to_dir(str(base_dir), delta, out)


def test_merge_refuses_a_different_base(trained) -> None:
    _, delta = trained
    with pytest.raises(AutolayerError, match="differs from the base the delta was trained from"):
        merge_delta(qwen3(seed=1), delta)
    with pytest.raises(AutolayerError, match="needs a base with 4 layers"):
        merge_delta(qwen3(seed=0, num_layers=6), delta)
    with pytest.raises(AutolayerError, match="bfloat16"):
        merge_delta(qwen3(seed=0).bfloat16(), delta)


def test_a_tampered_delta_is_refused(trained) -> None:
    _, delta = trained
    data = bytearray((delta / DELTA_FILE).read_bytes())
    data[-1] ^= 0xFF  # the last byte belongs to a tensor's data, not the header
    (delta / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(AutolayerError, match="does not match its manifest hash"):
        load_delta(delta)


def test_missing_or_broken_files_are_one_sentence_errors(trained, tmp_path) -> None:
    _, delta = trained
    (delta / DELTA_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AutolayerError, match="not a readable safetensors file"):
        load_delta(delta)
    (delta / DELTA_FILE).unlink()
    with pytest.raises(AutolayerError, match="incomplete"):
        load_delta(delta)
    with pytest.raises(AutolayerError, match="is missing; is .* an autolayer delta"):
        load_delta(tmp_path)


def test_save_is_atomic_and_refuses_to_clobber(trained, tmp_path, monkeypatch) -> None:
    model, delta = trained
    hashes = hash_parameters(qwen3(seed=0), layer_param_names(model, LAYERS))
    with pytest.raises(AutolayerError, match="already exists"):
        save_delta(model, LAYERS, delta, "tiny/qwen3", "rev1", base_hashes=hashes)
    save_delta(
        model,
        [2],
        delta,
        "tiny/qwen3",
        "rev1",
        base_hashes=hash_parameters(qwen3(seed=0), layer_param_names(model, [2])),
        overwrite=True,
    )
    assert load_delta(delta)[0]["layers"] == [2]

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("autolayer.delta.save_file", fail)
    with pytest.raises(AutolayerError, match="No space left"):
        save_delta(model, LAYERS, tmp_path / "new", "tiny/qwen3", None, base_hashes=hashes)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
