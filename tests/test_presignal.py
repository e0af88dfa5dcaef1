"""The pre-search signal: one short all-layers run, measured per layer, model put back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autolayer.config import ProxyConfig, config_from_dict
from autolayer.loading import load_for, prepare_task
from autolayer.presignal import LayerSignal, layer_signal, ranking
from autolayer.runner import run_search
from autolayer.study import StudyRecord, TrialRecord


def test_the_signal_measures_every_layer_and_leaves_the_model_as_it_was() -> None:
    config = config_from_dict({"task": {"train_size": 64, "eval_size": 16}})
    work = load_for(config, prepare_task(config))
    model, tokenizer, task = work
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = ProxyConfig(steps=2, prompts_per_step=4, num_generations=4, device="cpu")
    signals = layer_signal(work, fast, steps=2, lr=1e-3)
    assert [s.layer for s in signals] == list(range(8))
    assert all(s.update_norm > 0 and s.grad_norm > 0 for s in signals)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert all(not p._backward_hooks for p in model.parameters())  # hooks removed


def test_ranking_is_largest_first() -> None:
    signals = [LayerSignal(0, 0.1, 3.0), LayerSignal(1, 0.3, 1.0), LayerSignal(2, 0.2, 2.0)]
    assert ranking(signals) == [1, 2, 0]
    assert ranking(signals, by="grad_norm") == [0, 2, 1]


@pytest.mark.parametrize(("space", "stride"), [("single_layer", 1), ("every_other_layer", 2)])
def test_a_search_can_start_in_signal_order(tmp_path: Path, space: str, stride: int) -> None:
    config = config_from_dict(
        {
            "task": {"train_size": 64, "eval_size": 16},
            "proxy": {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "device": "cpu"},
            "search": {"n_trials": 3, "pruner": "none", "signal_steps": 2, "space": space},
            "tracking": {"enabled": False},
        }
    )
    study = run_search(config, root=tmp_path).study
    signals = [LayerSignal(**s) for s in StudyRecord.of(study).presearch_signal or ()]
    tried = [r.layers[0] for r in map(TrialRecord.of, study.trials) if r.layers]
    assert tried == [x for x in ranking(signals) if x % stride == 0][:3]  # on the space's grid
