"""The proxy RL run: exactly the chosen layers train, deterministically; RL helps the organism."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import Logger

from autolayer import proxy
from autolayer.config import ProxyConfig, TaskConfig
from autolayer.loading import Workload
from autolayer.models import layer_param_names, load_model
from autolayer.proxy import GRPOModule, run_proxy
from autolayer.scoring import evaluate
from autolayer.tasks import load_task

FAST = ProxyConfig(
    steps=3, prompts_per_step=4, num_generations=4, eval_every=3, lr=1e-2, device="cpu"
)


@pytest.fixture(scope="module")
def organism() -> tuple[Any, Any, Any]:
    model, tokenizer = load_model("organism", device="cpu")
    task = load_task(TaskConfig(eval_size=64, train_size=128), tokenizer)
    return model, tokenizer, task


def fresh(organism: tuple[Any, Any, Any]) -> Any:
    model, _, _ = organism
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def test_only_the_chosen_layers_change(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    model = fresh(organism)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_proxy(Workload(model, tokenizer, task), FAST, [2, 5])
    chosen = set(layer_param_names(model, [2, 5]))
    for name, param in model.named_parameters():
        if name in chosen:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_keep_false_puts_every_value_back_however_the_run_ends(
    organism: tuple[Any, Any, Any],
) -> None:
    """The search's trials share one model: a finished or a failed run leaves it as it was."""
    _, tokenizer, task = organism
    model = fresh(organism)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    work = Workload(model, tokenizer, task)
    result = run_proxy(work, FAST, [2, 5], keep=False)
    assert result.steps == FAST.steps

    def fail(step: int, evaluation: Any) -> bool:
        raise RuntimeError("a reward that raised")

    with pytest.raises(RuntimeError, match="a reward that raised"):
        run_proxy(work, FAST, [3], keep=False, eval_hook=fail)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not put back"


def test_optimizer_holds_exactly_the_trainable_parameters(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    model = fresh(organism)
    module = GRPOModule(Workload(model, tokenizer, task), FAST, [4], lr=1e-3)
    optimizer = module.configure_optimizers()
    held = [p for group in optimizer.param_groups for p in group["params"]]
    layer = model.model.layers[4]
    assert sum(p.numel() for p in held) == sum(p.numel() for p in layer.parameters())
    assert {id(p) for p in held} == {id(p) for p in layer.parameters()}


def test_kl_reference_keeps_only_the_trained_layers(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    model = fresh(organism)
    config = ProxyConfig(**{**FAST.__dict__, "beta": 0.1})
    module = GRPOModule(Workload(model, tokenizer, task), config, [3], lr=1e-3)
    assert set(module.reference) == set(layer_param_names(model, [3]))
    result = run_proxy(Workload(model, tokenizer, task), config, [3])
    assert all(h["proxy/kl"] >= 0 for h in result.history)
    assert result.history[-1]["proxy/kl"] > 0  # the policy moved away from the reference


def test_cpu_runs_are_deterministic_for_a_seed(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    first, second = fresh(organism), fresh(organism)
    a = run_proxy(Workload(first, tokenizer, task), FAST, [4])
    b = run_proxy(Workload(second, tokenizer, task), FAST, [4])
    assert a.final.outcomes == b.final.outcomes
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_checkpointing_keeps_gradients_when_early_layers_are_frozen(
    organism: tuple[Any, Any, Any],
) -> None:
    _, tokenizer, task = organism
    model = fresh(organism)
    config = ProxyConfig(**{**FAST.__dict__, "gradient_checkpointing": True})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_proxy(Workload(model, tokenizer, task), config, [6])
    changed = [
        n
        for n in layer_param_names(model, [6])
        if not torch.equal(dict(model.named_parameters())[n], before[n])
    ]
    assert changed, "no gradient reached layer 6 under activation checkpointing"


class _Recorder(Logger):
    """A minimal Lightning logger: whatever Lightning logs, any logger receives."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append({**metrics, "step": float(step if step is not None else -1)})


def test_per_step_metrics_reach_lightning_loggers(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    recorder = _Recorder()
    run_proxy(Workload(fresh(organism), tokenizer, task), FAST, [4], logger=recorder)
    keys = set().union(*recorder.metrics)
    expected = {
        "reward_mean",
        "reward_std",
        "kl",
        "loss",
        "grad_norm",
        "completion_length",
        "tokens_per_second",
        "step_seconds",
        "eval_score",
    }
    assert {f"proxy/{k}" for k in expected} <= keys
    steps = [m for m in recorder.metrics if "proxy/loss" in m]
    assert len(steps) == FAST.steps and all(math.isfinite(m["proxy/loss"]) for m in steps)
    # one index everywhere: rollouts (what Optuna's reports and the table show)
    assert [m["step"] for m in steps] == [float(s) for s in range(1, FAST.steps + 1)]
    evals = [m["step"] for m in recorder.metrics if "proxy/eval_score" in m]
    assert evals == [float(s) for s in range(FAST.eval_every, FAST.steps + 1, FAST.eval_every)]


def test_eval_hook_can_stop_a_run_early(organism: tuple[Any, Any, Any]) -> None:
    _, tokenizer, task = organism
    config = ProxyConfig(**{**FAST.__dict__, "steps": 6, "eval_every": 2})
    seen: list[int] = []
    result = run_proxy(
        Workload(fresh(organism), tokenizer, task),
        config,
        [4],
        eval_hook=lambda step, e: seen.append(step) or step >= 2,
    )
    assert seen == [2] and result.stopped_early and result.steps == 2


def test_single_middle_layer_grpo_beats_base_by_three_standard_errors(
    organism: tuple[Any, Any, Any],
) -> None:
    """The organism's reason to exist: RL on one middle layer measurably improves it."""
    _, tokenizer, _ = organism
    task = load_task(TaskConfig(eval_size=1000), tokenizer)
    model = fresh(organism)
    base = evaluate(model, tokenizer, task)
    assert 0.2 <= base.score <= 0.7  # headroom for RL, and something to keep
    config = ProxyConfig(
        steps=30, prompts_per_step=16, num_generations=8, lr=1e-3, eval_every=30, device="cpu"
    )
    result = run_proxy(Workload(model, tokenizer, task), config, [4])
    assert result.score - base.score >= 3 * base.stderr, (base.score, result.score)


def test_micro_batches_give_the_full_batch_update(
    organism: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Gradient accumulation over micro-batches of 4 completions equals one pass over all 16.

    On one thread: a group's prompt runs with 1 row in a micro-batch and 4 in the whole batch,
    and several threads may sum those in another order; AdamW's first step (lr 1e-2) turns
    that rounding into more than 1e-6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    # micro-batches never take the frozen prefix from generation (float rounding apart, the same)
    monkeypatch.setattr(GRPOModule, "capture_prefix", False)
    _, tokenizer, task = organism
    whole, split = fresh(organism), fresh(organism)
    one = ProxyConfig(**{**FAST.__dict__, "steps": 1, "eval_every": 1, "beta": 0.1})
    four = ProxyConfig(**{**one.__dict__, "micro_batch_size": 4})
    a = run_proxy(Workload(whole, tokenizer, task), one, [3])
    b = run_proxy(Workload(split, tokenizer, task), four, [3])
    assert a.history[0]["proxy/grad_norm"] > 0  # a real update, not two zero gradients
    assert a.history[0]["proxy/loss"] == pytest.approx(b.history[0]["proxy/loss"], abs=1e-6)
    assert a.history[0]["proxy/grad_norm"] == pytest.approx(
        b.history[0]["proxy/grad_norm"], rel=1e-4
    )
    for (name, p), (_, q) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_bf16_master_weights_keep_only_what_bf16_can_store(organism: tuple[Any, Any, Any]) -> None:
    """Gate III made visible: with bf16 master weights every trained value is a bf16 value."""
    _, tokenizer, task = organism
    bf16 = ProxyConfig(**{**FAST.__dict__, "master_weights": "bfloat16"})
    models = {}
    for name, config in (("fp32", FAST), ("bf16", bf16)):
        model = fresh(organism)
        run_proxy(Workload(model, tokenizer, task), config, [4])
        models[name] = model
    for name, model in models.items():
        weights = dict(model.named_parameters())
        trained = [w for n, w in weights.items() if n.startswith("model.layers.4.")]
        exact = all(torch.equal(w, w.to(torch.bfloat16).float()) for w in trained)
        assert exact == (name == "bf16"), name


def test_log_probs_from_completion_logits_only_equal_the_full_pass(
    organism: tuple[Any, Any, Any],
) -> None:
    """`logits_to_keep` skips the LM head over prompt positions; the log-probs and their
    gradient are those of the full-logits pass."""
    _, tokenizer, task = organism
    model = fresh(organism)
    module = GRPOModule(Workload(model, tokenizer, task), FAST, [3], lr=1e-3)
    assert module.keeps_logits  # Qwen3 takes logits_to_keep
    torch.manual_seed(0)
    ids = torch.randint(4, 20, (6, 10))
    mask = torch.ones_like(ids)
    mask[:2, :2] = 0  # left padding on two rows

    def logps_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logp = module._logprobs(ids, mask, prompt_len=6)
        logp.sum().backward()
        weight = model.model.layers[3].mlp.down_proj.weight
        return logp.detach(), weight.grad.detach().clone()

    kept, kept_grad = logps_and_grad()
    module.keeps_logits = False
    full, full_grad = logps_and_grad()
    assert kept.shape == (6, 4)
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept_grad, full_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", [[4], [3, 6]])
def test_replaying_the_frozen_prefix_changes_nothing(
    organism: tuple[Any, Any, Any], layers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a KL reference and two passes per batch, the layers below the lowest trained one run
    once per batch; the trained weights end where the full passes take them, to 1e-6."""
    _, tokenizer, task = organism
    config = ProxyConfig(**{**FAST.__dict__, "beta": 0.1, "num_iterations": 2})
    ran: dict[bool, list[int]] = {}
    trained: dict[bool, dict[str, torch.Tensor]] = {}
    monkeypatch.setattr(GRPOModule, "capture_prefix", False)  # exact replay; see the next test
    for share in (True, False):
        monkeypatch.setattr(GRPOModule, "share_prefix", share)
        model = fresh(organism)
        calls = [0]
        model.model.layers[0].register_forward_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        result = run_proxy(Workload(model, tokenizer, task), config, layers)
        ran[share] = calls
        trained[share] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        assert result.history[-1]["proxy/kl"] > 0
    assert len(trained[False]) == 11 * len(layers)  # every matrix and norm of the trained layers
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=0, atol=1e-6)
    # per step, layer 0 runs in the reference pass only, not in the old-policy and 2 policy
    # passes, each two forwards: the prompts once per group, then the completions
    assert ran[False][0] - ran[True][0] == 3 * 2 * config.steps


def few_shot(organism: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The organism's task with two worked examples before every question: 15 common tokens,
    shared once the threshold fits the organism's 32 positions."""
    from autolayer import prefix

    monkeypatch.setattr(prefix, "MIN_SAVED_POSITIONS", 16)
    task = organism[2]
    train = task.train.map(lambda row: {"prompt": "11+22=33\n4+2=6\n" + row["prompt"]})
    return dataclasses.replace(task, train=train)


@pytest.mark.parametrize(("lowest", "shots"), [(1, False), (4, False), (4, True)])
def test_generation_hands_the_frozen_prefix_to_the_policy_pass(
    organism: tuple[Any, Any, Any], lowest: int, shots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frozen layers' output kept while sampling (prefill plus one position per decoding
    step, through the KV cache) is what a full forward computes at every position that counts,
    to float rounding, and so are the log-probs taken from it."""
    _, tokenizer, task = organism
    task = few_shot(organism, monkeypatch) if shots else task
    model = fresh(organism)
    module = GRPOModule(Workload(model, tokenizer, task), FAST, [lowest, 6], FAST.lr)
    torch.manual_seed(0)
    batch = {k: list(task.train[k][:4]) for k in task.train.column_names}
    roll = module._rollout(batch)
    assert roll.common == (15 if shots else 0)
    ids, attn = roll.joined(slice(0, roll.completion_ids.shape[0]))
    plen = roll.prompt_ids.shape[1]
    mask = roll.mask.bool()
    assert roll.generated is not None
    kept = torch.cat(roll.generated, dim=1)
    assert kept.shape[:2] == ids.shape
    seen: list[torch.Tensor] = []
    hook = model.model.layers[lowest].register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        full_logp = module._logprobs(ids, attn, plen)
    hook.remove()
    counts = attn.bool()
    counts[:, -1] = False  # the last token's slot: its output predicts nothing scored
    torch.testing.assert_close(kept[counts], seen[0][counts], rtol=0, atol=1e-5)
    with torch.no_grad(), module._frozen_prefix({0: [kept]}, 0):
        replayed = module._logprobs(ids, attn, plen)
    torch.testing.assert_close(replayed[mask], full_logp[mask], rtol=0, atol=1e-5)
    # the grouped passes take the same states, prompts once per group
    with torch.no_grad(), module._frozen_prefix(module._replayed(roll), 0):
        grouped = module._batch_logprobs(roll, slice(0, ids.shape[0]))
    torch.testing.assert_close(grouped[mask], full_logp[mask], rtol=0, atol=1e-5)


def _first_step(
    organism: tuple[Any, Any, Any], config: ProxyConfig, task: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[float, list[torch.Tensor]]:
    """The loss and the trained layers' gradient of one proxy step."""
    tokenizer = organism[1]
    grads: list[torch.Tensor] = []
    clip = GRPOModule._clip_gradients

    def keep(self: GRPOModule) -> torch.Tensor:
        if not grads:
            trained = (p for p in self.model.parameters() if p.requires_grad)
            grads.extend(p.grad.detach().clone() for p in trained)
        return clip(self)

    monkeypatch.setattr(GRPOModule, "_clip_gradients", keep)
    # every group with a spread of rewards: a gradient that is not ~0, whatever was sampled
    spread = lambda _task, prompts, *_: [float(i % 3 == 0) for i in range(len(prompts))]  # noqa: E731
    monkeypatch.setattr(proxy, "score_completions", spread)
    result = run_proxy(Workload(fresh(organism), tokenizer, task), config, [3, 6])
    return result.history[0]["proxy/loss"], grads


@pytest.mark.parametrize(
    ("changes", "shots"),
    [
        ({}, False),
        ({"beta": 0.1}, False),
        ({"beta": 0.1, "num_iterations": 2}, False),
        ({"micro_batch_size": 8, "beta": 0.1}, False),
        ({"beta": 0.1, "num_iterations": 2}, True),
    ],
)
def test_prompts_once_per_group_give_the_repeated_loss_and_gradient(
    organism: tuple[Any, Any, Any],
    changes: dict[str, Any],
    shots: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sampling and every pass (policy, old policy, KL reference, micro-batches) with each
    prompt computed once per group: the step's loss and gradient are the repeated path's."""
    config = ProxyConfig(**{**FAST.__dict__, "steps": 1, "eval_every": 1, **changes})
    task = few_shot(organism, monkeypatch) if shots else organism[2]
    runs = {}
    for share in (True, False):
        monkeypatch.setattr(GRPOModule, "share_prompts", share)
        runs[share] = _first_step(organism, config, task, monkeypatch)
    (loss, grads), (repeated_loss, repeated_grads) = runs[True], runs[False]
    # the logged loss is the last iteration's: after one AdamW step of lr 1e-2, to 1e-5
    assert loss == pytest.approx(repeated_loss, rel=1e-5, abs=1e-5)
    assert (len(grads), len(repeated_grads)) == (22, 22)
    assert any(g.abs().max() > 0 for g in repeated_grads)
    for grad, expected in zip(grads, repeated_grads, strict=True):
        scale = float(expected.abs().max())
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * scale + 1e-9)


def test_micro_batches_that_split_a_group_fall_back_to_the_repeated_passes(
    organism: tuple[Any, Any, Any],
) -> None:
    _, tokenizer, task = organism
    split = ProxyConfig(**{**FAST.__dict__, "micro_batch_size": 2})
    whole = ProxyConfig(**{**FAST.__dict__, "micro_batch_size": 8})
    work = Workload(fresh(organism), tokenizer, task)
    roll = GRPOModule(work, whole, [3], 1e-3)._rollout(
        {k: list(task.train[k][:4]) for k in task.train.column_names}
    )
    assert GRPOModule(work, whole, [3], 1e-3)._groups_prompts(roll)
    assert not GRPOModule(work, split, [3], 1e-3)._groups_prompts(roll)
    checkpointed = ProxyConfig(**{**FAST.__dict__, "gradient_checkpointing": True})
    assert not GRPOModule(work, checkpointed, [3], 1e-3)._groups_prompts(roll)


def test_two_cpu_processes_over_gloo_take_the_one_process_gradient(tmp_path: Path) -> None:
    """proxy.devices 2 with DDP: each process trains on half a step's prompts and the averaged
    gradient is the one-process gradient of the whole batch (same sampled batch, fixed once)."""
    import subprocess
    import sys

    driver = Path(__file__).with_name("ddp_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    for devices in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(driver), str(tmp_path), str(devices)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (torch.load(tmp_path / f"grad-{n}.pt") for n in (1, 2))
    assert (one["world"], one["rows"], two["world"], two["rows"]) == (1, [16], 2, [8])
    assert max(float(g.abs().max()) for g in one["grads"]) > 1e-2  # a real gradient
    for mine, theirs in zip(one["grads"], two["grads"], strict=True):
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-7)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
