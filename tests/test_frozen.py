"""The frozen layers below the trained ones, prefilled once per study: every run that replays
them scores and trains exactly as one that runs them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autolayer import prefix
from autolayer.config import ProxyConfig, TaskConfig
from autolayer.frozen import FrozenStates
from autolayer.loading import Workload
from autolayer.models import load_model
from autolayer.proxy import ProxyResult, run_proxy
from autolayer.tasks import load_task

SHOTS = "11+22=33\n4+2=6\n"  # worked examples before every question: a common prefix
CONFIG = ProxyConfig(
    steps=4, prompts_per_step=4, num_generations=4, eval_every=2, lr=1e-2, device="cpu"
)


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Workload:
    """The organism with two worked examples before every training and held-out question
    (15 common tokens: shared once the threshold fits the organism's 32 positions)."""
    monkeypatch.setattr(prefix, "MIN_SAVED_POSITIONS", 16)
    model, tokenizer = load_model("organism", device="cpu")
    task = load_task(TaskConfig(eval_size=48, train_size=64), tokenizer)
    shots = lambda row: {"prompt": SHOTS + row["prompt"]}  # noqa: E731
    task = dataclasses.replace(task, train=task.train.map(shots), eval=task.eval.map(shots))
    return Workload(model.eval(), tokenizer, task)


def _same(a: ProxyResult, b: ProxyResult) -> None:
    assert a.final.outcomes == b.final.outcomes
    assert a.evals == b.evals
    assert [h["proxy/loss"] for h in a.history] == [h["proxy/loss"] for h in b.history]


def test_trials_replaying_the_study_prefills_score_and_train_as_without_them(
    work: Workload,
) -> None:
    """A search's trials in turn on one model, each putting back what it trained: with the
    store, the layers below each trial's lowest come from the first prefill deep enough, and
    every held-out outcome, eval score and step loss is the one computed without it."""
    before = {n: p.detach().clone() for n, p in work.model.named_parameters()}
    trials = [[2], [5], [3, 6], [0], [5]]
    alone = [run_proxy(work, CONFIG, layers, keep=False) for layers in trials]
    states = FrozenStates()
    hits = []
    for layers, expected in zip(trials, alone, strict=True):
        _same(run_proxy(work, CONFIG, layers, keep=False, states=states), expected)
        hits.append(states.hits)
    # [2] keeps its prefills 2 deep and replays the held-out one in its second evaluation; [5]
    # finds them too shallow, keeps them 5 deep and replays the held-out one once as well;
    # [3, 6] and the second [5] replay all 6 (2 evaluations, 4 rollouts); [0] has none frozen
    assert hits == [1, 2, 8, 8, 14]
    assert {entry.depth for entry in states.entries.values()} == {5}
    assert len(states.entries) == 5  # the held-out batch and the 4 steps' prompts
    for name, param in work.model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not put back"


def test_a_store_over_its_bound_keeps_nothing_and_changes_nothing(work: Workload) -> None:
    expected = run_proxy(work, CONFIG, [3], keep=False)
    states = FrozenStates(limit_mb=0.0)
    for _ in range(2):
        _same(run_proxy(work, CONFIG, [3], keep=False, states=states), expected)
    assert (states.hits, states.entries, states.nbytes) == (0, {}, 0)


def test_prompts_with_nothing_to_share_are_not_kept(work: Workload) -> None:
    """Without a common prefix or repeated rows a batch prefills as usual (`prefix.prefill`
    shares nothing), so there is nothing to keep: held-out prompts without worked examples."""
    task = work.task
    plain = dataclasses.replace(task, eval=task.eval.map(lambda r: {"prompt": r["prompt"][15:]}))
    plain_work = Workload(work.model, work.tokenizer, plain)
    states = FrozenStates()
    run_proxy(plain_work, dataclasses.replace(CONFIG, steps=2), [3], keep=False, states=states)
    assert len(states.entries) == 2  # the two steps' rollouts (each prompt sampled 4 times)


def test_kept_prefills_hold_each_distinct_position_once(work: Workload) -> None:
    """A rollout's batch is G copies of each few-shot prompt: the store keeps the common prefix
    once and each prompt's own columns once, not the cache copied out to every row."""
    states = FrozenStates()
    config = dataclasses.replace(CONFIG, steps=1, eval_every=1)
    run_proxy(work, config, [3], keep=False, states=states)
    for entry in states.entries.values():
        for i in range(entry.depth):
            _, keys, _ = entry.layers[i]
            whole = entry.cache_layer(i).keys
            assert keys.common is not None and keys.common.shape[2] == 15
            assert keys.nbytes < whole.numel() * whole.element_size() / 2
