"""An unreachable hub is one sentence in seconds, not minutes of retries."""

from __future__ import annotations

import socket

import datasets
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from autolayer import hub
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError
from autolayer.models import load_model
from autolayer.tasks import load_task


@pytest.fixture(autouse=True)
def unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub._reachable.cache_clear()


def test_a_hub_model_or_dataset_fails_fast_without_a_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fast means one short TCP probe, then the sentence: transformers and datasets, which retry
    for minutes without a network, are never asked."""
    probes: list[tuple[tuple[str, int], float]] = []
    real = socket.create_connection

    def probe(address: tuple[str, int], timeout: float, *args: object) -> socket.socket:
        probes.append((address, timeout))
        return real(address, timeout, *args)  # type: ignore[arg-type]

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a library was asked for the hub after the probe failed")

    monkeypatch.setattr(socket, "create_connection", probe)
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", never)
    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(AutolayerError, match="cannot reach the Hugging Face hub .* model 'org/m'"):
        load_model("org/m", device="cpu")
    with pytest.raises(AutolayerError, match="the dataset 'org/data'"):
        load_task(TaskConfig(name="mine", dataset="org/data", reward_funcs=["os.path.join"]))
    assert probes == [(("127.0.0.1", 9), hub.TIMEOUT)]  # once, bounded, and remembered
    assert hub.TIMEOUT <= 5


def test_offline_mode_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.require_hub("anything")  # the libraries will read their cache instead
