"""The final TRL run: layer selection, freezing per strategy, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from autolayer.config import config_from_dict
from autolayer.delta import load_delta, merge_to_dir
from autolayer.errors import AutolayerError
from autolayer.layers import ORGANISM, resolve_model_path
from autolayer.models import layer_param_names, load_model
from autolayer.scoring import Evaluation
from autolayer.study import trial_fields, write_study
from autolayer.tasks import load_task
from autolayer.train import (
    TrackerCallback,
    _per_process_batch,
    check_trainable,
    contribution_vs_study,
    freeze_for_strategy,
    grpo_args,
    run_training,
    select_layers,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def model_name() -> str:
    return ORGANISM


# ---- select_layers -------------------------------------------------------------------------------


def fake_study(trials: list[tuple[float, list[int]]]) -> optuna.Study:
    """An in-memory study of COMPLETE trials (value, layers), plus a failed and a pruned one."""
    study = optuna.create_study(study_name="fake", direction="maximize")
    for value, layers in trials:
        study.add_trial(create_trial(value=value, user_attrs=trial_fields(layers=layers, lr=1e-3)))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=trial_fields(layers=[0])))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=trial_fields(layers=[7])))
    study.add_trial(create_trial(value=9.0, user_attrs=trial_fields(infeasible=True)))  # untrained
    return study


RANKED = [(0.5, [1]), (0.9, [5]), (0.8, [2, 4]), (0.7, [5, 6])]


@pytest.mark.parametrize("strategy", ["only", "boost"])
@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        (1, (5,)),  # the best trial
        (2, (2, 5)),  # 5, then the 0.8 trial's first layer
        (3, (2, 4, 5)),  # 5, then both layers of the 0.8 trial
        (4, (2, 4, 5, 6)),  # the 0.7 trial adds 6 (its 5 is a duplicate)
        (5, (1, 2, 4, 5, 6)),
    ],
)
def test_select_layers_ranks_trials_by_value(
    strategy: str, top_k: int, expected: tuple[int, ...]
) -> None:
    assert select_layers(fake_study(RANKED), strategy, top_k, num_layers=8) == expected


def test_select_layers_mid_needs_no_study() -> None:
    assert select_layers(None, "mid", 2, num_layers=8) == (3, 4)
    assert select_layers(None, "mid", 3, num_layers=8) == (2, 3, 4)  # [floor(8/2-1.5), ...)
    assert select_layers(fake_study(RANKED), "mid", 1, num_layers=7) == (3,)


@pytest.mark.parametrize(
    ("study", "strategy", "top_k", "message"),
    [
        (fake_study([]), "only", 1, "no complete trials"),
        (fake_study(RANKED), "only", 6, "only 5 distinct layers"),
        (None, "only", 1, "needs a study"),
        (fake_study(RANKED), "best", 1, "unknown strategy"),
        (fake_study(RANKED), "only", 9, "between 1 and"),
        (fake_study([(1.0, [12])]), "only", 1, "out of range"),  # a study of another model
    ],
)
def test_select_layers_errors(study: Any, strategy: str, top_k: int, message: str) -> None:
    with pytest.raises(AutolayerError, match=message):
        select_layers(study, strategy, top_k, num_layers=8)


# ---- freeze_for_strategy -------------------------------------------------------------------------

# hidden 32, 2 query heads and 1 KV head of dim 16, MLP 64, vocab 50, 4 layers, tied embeddings.
# One layer: q 32*32=1024, k 32*16=512, v 512, o 1024, q_norm 16, k_norm 16,
# gate/up/down 3*32*64=6144, two RMSNorms 2*32=64  ->  9312.
# Whole model: embeddings 50*32=1600 (tied to the LM head) + 4*9312 + final norm 32  ->  38880.
LAYER_PARAMS, TOTAL_PARAMS = 9312, 38880


@pytest.fixture
def small_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
        )
    )


def numel(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("strategy", ["only", "mid"])
def test_freeze_only_and_mid_train_exactly_the_layers(
    small_qwen3: Qwen3ForCausalLM, strategy: str
) -> None:
    groups = freeze_for_strategy(small_qwen3, strategy, [1, 2], lr=1e-2, base_lr=1e-4)
    assert [(g["name"], g["lr"], numel(g["params"])) for g in groups] == [
        ("chosen", 1e-2, 2 * LAYER_PARAMS)
    ]
    trainable = {n for n, p in small_qwen3.named_parameters() if p.requires_grad}
    assert trainable == set(layer_param_names(small_qwen3, [1, 2]))
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in trainable)


def test_freeze_boost_trains_everything_in_two_groups(small_qwen3: Qwen3ForCausalLM) -> None:
    groups = freeze_for_strategy(small_qwen3, "boost", [1], lr=1e-2, base_lr=1e-4)
    assert [(g["name"], g["lr"], numel(g["params"])) for g in groups] == [
        ("chosen", 1e-2, LAYER_PARAMS),
        ("rest", 1e-4, TOTAL_PARAMS - LAYER_PARAMS),
    ]
    assert all(p.requires_grad for p in small_qwen3.parameters())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(small_qwen3.parameters()))  # each param once


def test_check_trainable_catches_a_changed_set(small_qwen3: Qwen3ForCausalLM) -> None:
    groups = freeze_for_strategy(small_qwen3, "only", [0], lr=1e-2, base_lr=1e-4)
    expected = {n for n, p in small_qwen3.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(groups)
    check_trainable(small_qwen3, expected, optimizer)
    small_qwen3.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="trainable set changed"):
        check_trainable(small_qwen3, expected, optimizer)


# ---- references and tracking ---------------------------------------------------------------------


def study_with_refs(base: list[float], full: list[float]) -> optuna.Study:
    study = optuna.create_study(study_name="refs")
    write_study(study, reference_base_outcomes=base, reference_full_outcomes=full)
    return study


BASE = [0.0] * 10 + [1.0] * 10  # S_base 0.5
FULL = [1.0] * 20  # S_full 1.0: a gain of 0.5, far outside noise


def test_contribution_against_the_study_reference() -> None:
    after = Evaluation.from_outcomes([1.0] * 5 + [0.0] * 5 + [1.0] * 10)  # 0.75
    base = Evaluation.from_outcomes(BASE)
    c, note = contribution_vs_study(after, base, study_with_refs(BASE, FULL), 0)
    assert c is not None and c.value == pytest.approx((0.75 - 0.5) / (1.0 - 0.5))
    assert c.low is not None and c.high is not None and c.low <= 0.5 <= c.high
    assert note == "against the study's all-layers proxy run"  # the study recorded no horizon
    study = study_with_refs(BASE, FULL)
    write_study(study, proxy_steps=30)
    _, note = contribution_vs_study(after, base, study, 0)
    assert "all-layers run of 30 proxy steps" in note and "--reference" in note


def test_contribution_needs_the_same_prompts() -> None:
    after = Evaluation.from_outcomes([1.0] * 20)
    other_base = Evaluation.from_outcomes([1.0] + BASE[1:])  # another eval set scores differently
    c, note = contribution_vs_study(after, other_base, study_with_refs(BASE, FULL), 0)
    assert c is None and "different held-out set" in note
    c, note = contribution_vs_study(after, after, optuna.create_study(), 0)
    assert c is None and "no all-layers reference" in note
    c, note = contribution_vs_study(after, after, None, 0)
    assert c is None and "no study" in note


class RecordingTracker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, float], int | None]] = []

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((run_id, dict(metrics), step))


def test_tracker_callback_forwards_numeric_logs_by_global_step() -> None:
    tracker = RecordingTracker()
    callback = TrackerCallback(tracker, "run1")  # type: ignore[arg-type]
    logs = {"loss": 0.5, "reward": 1, "completions/mean_length": 3.5, "flag": True, "text": "x"}
    callback.on_log(None, SimpleNamespace(global_step=7), None, logs=logs)  # type: ignore[arg-type]
    callback.on_log(None, SimpleNamespace(global_step=8), None, logs={"note": "only text"})  # type: ignore[arg-type]
    assert tracker.calls == [
        ("run1", {"train/loss": 0.5, "train/reward": 1.0, "train/completions/mean_length": 3.5}, 7)
    ]


# ---- one real run --------------------------------------------------------------------------------


def tiny_config(model: str, tmp_path: Path) -> Any:
    return config_from_dict(
        {
            "model": {"name": model, "dtype": "float32"},
            "task": {"name": "organism", "train_size": 64, "eval_size": 100},
            "proxy": {
                "prompts_per_step": 4,
                "num_generations": 4,
                "beta": 0.04,
                "device": "cpu",
                "seed": 0,
            },
            "train": {"steps": 2, "lr": 3e-2},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )


def test_run_training_end_to_end(model_name: str, tmp_path: Path) -> None:
    import mlflow

    config = tiny_config(model_name, tmp_path)
    study = optuna.create_study(study_name="e2e-study")
    write_study(study, mlflow_parent_run_id="parent-run-123")
    out = tmp_path / "out"
    result = run_training(config, [3], "only", study=study, root=tmp_path / "root", out_dir=out)

    assert sorted(p.name for p in out.iterdir()) == ["delta", "model", "train_summary.json"]
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base, _ = load_model(model_name, dtype="float32", device="cpu")
    chosen = set(layer_param_names(base, [3]))
    trained_params = dict(trained.named_parameters())
    assert trained_params.keys() == dict(base.named_parameters()).keys()
    for name, param in base.named_parameters():
        assert trained_params[name].dtype == torch.float32
        if name not in chosen:
            assert torch.equal(trained_params[name], param), name  # frozen stays frozen
    base_params = dict(base.named_parameters())
    changed = [n for n in chosen if not torch.equal(trained_params[n], base_params[n])]
    assert changed, "training changed none of the chosen layer's parameters"

    merged = merge_to_dir(model_name, out / "delta", tmp_path / "merged")
    merged_params = dict(AutoModelForCausalLM.from_pretrained(merged).named_parameters())
    for name, param in trained_params.items():
        assert torch.equal(merged_params[name], param), name
    manifest, tensors = load_delta(out / "delta")
    assert manifest["layers"] == [3] and set(tensors) == chosen

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["layers"] == [3] and summary["strategy"] == "only" and summary["steps"] == 2
    assert summary["score_before"] == result.before.score and summary["eval_prompts"] == 100
    assert summary["contribution"] is None
    assert "no all-layers reference" in summary["contribution_note"]
    assert result.trainable_params == sum(base_params[n].numel() for n in chosen)

    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "e2e-study"
    assert run.data.params["layers"] == "3" and run.data.params["strategy"] == "only"
    assert run.data.params["model"] == model_name and run.data.params["steps"] == "2"
    assert run.data.tags["autolayer.study"] == "e2e-study"
    assert run.data.tags["autolayer.parent_run"] == "parent-run-123"
    assert "mlflow.parentRunId" not in run.data.tags  # its own top-level run, not nested
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [1, 2]
    assert run.data.metrics["final/score_after"] == pytest.approx(result.after.score)

    with pytest.raises(AutolayerError, match="already exists"):
        run_training(config, [3], "only", root=tmp_path / "root", out_dir=out)


def test_boost_trains_everything_and_says_the_delta_is_partial(tmp_path: Path) -> None:
    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.beta = 0.0
    config.tracking.enabled = False
    config.train.steps, config.train.boost_base_lr = 2, 1e-2  # step 1 draws only zero-std groups
    out = tmp_path / "out"
    result = run_training(config, [3], "boost", root=tmp_path / "root", out_dir=out)
    assert result.run_id == "" and result.trainable_params == TOTAL_ORGANISM_PARAMS
    trained = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    base, _ = load_model(ORGANISM, dtype="float32", device="cpu")
    outside = [
        n
        for n, p in base.named_parameters()
        if not n.startswith("model.layers.3.") and not torch.equal(trained[n], p)
    ]
    assert outside  # layers other than the chosen one moved too
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    assert "does NOT reproduce" in manifest["note"] and manifest["layers"] == [3]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["delta_reproduces_model"] is False and summary["boost_base_lr"] == 1e-2


TOTAL_ORGANISM_PARAMS = 494_144  # organism.make_config: 8 layers, hidden 64, tied embeddings


@pytest.mark.parametrize(("micro", "per_device", "accumulation"), [(None, 16, 1), (4, 4, 4)])
def test_grpo_args_keep_one_generation_per_step(
    tmp_path: Path, micro: int | None, per_device: int, accumulation: int
) -> None:
    # 4 prompts x G=4 = 16 completions per optimizer step, whatever the micro-batch
    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.micro_batch_size = micro
    task = load_task(config.task)
    args = grpo_args(config, task, tmp_path)
    assert args.per_device_train_batch_size == per_device
    assert args.gradient_accumulation_steps == accumulation
    assert args.generation_batch_size == 16 and args.steps_per_generation == accumulation


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo"])
def test_trl_optimises_the_proxys_objective_with_a_kl_penalty(
    tmp_path: Path, algorithm: str
) -> None:
    """The same batch through TRL's own _compute_loss and through rl.policy_loss (beta > 0):
    equal loss and equal gradient on the trained layer."""
    from autolayer import rl
    from autolayer.rollout import completion_mask, generate_completions
    from autolayer.train import build_trainer

    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.algorithm = algorithm
    model, tokenizer = load_model(ORGANISM, device="cpu")
    task = load_task(config.task, tokenizer)
    groups = freeze_for_strategy(model, "only", [3], 1e-3, 0.0)
    trainer = build_trainer(model, tokenizer, task, grpo_args(config, task, tmp_path), groups, [])
    torch.manual_seed(0)
    prompts = [p for p in task.train["prompt"][:4] for _ in range(4)]  # 6 characters: no padding
    prompt_ids, prompt_mask, completion_ids, _ = generate_completions(
        model, tokenizer, prompts, task.max_completion_length, do_sample=True
    )
    mask = completion_mask(model, tokenizer, completion_ids)
    advantages = rl.group_advantages(torch.randn(16), 4, algorithm)  # type: ignore[arg-type]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, mask.long()], dim=1)

    def ours() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=attention).logits[
            :, prompt_ids.shape[1] - 1 : -1
        ]
        return rl.token_logprobs(logits, completion_ids)

    with torch.no_grad():
        ref = ours() + 0.05 * torch.randn(mask.shape)  # a reference that differs from the policy
    model.train()
    logp = ours()
    expected = rl.policy_loss(
        logp, logp.detach(), advantages, mask, algorithm,  # type: ignore[arg-type]
        beta=0.04, ref_logp=ref, max_completion_length=task.max_completion_length,
    ).loss  # fmt: skip
    expected.backward()
    ours_grad = [p.grad.clone() for p in trainer.optimizer.param_groups[0]["params"]]
    model.zero_grad(set_to_none=True)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": mask.long(), "advantages": advantages, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; one step here
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours_grad, trainer.optimizer.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(theirs.grad, mine, rtol=1e-4, atol=1e-6)


def test_train_uses_the_lr_the_study_measured_unless_told(tmp_path: Path) -> None:
    """A pick trained at another lr than the search measured it at is not the pick."""
    from autolayer.train import train_lr, trial_lr

    study = optuna.create_study(direction="maximize")
    for value, layers, lr in [(0.7, [5], 1e-2), (0.9, [5], 2e-3), (0.8, [2, 4], 5e-4)]:
        study.add_trial(create_trial(value=value, user_attrs=trial_fields(layers=layers, lr=lr)))
    pruned = trial_fields(layers=[7], lr=1.0)
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=pruned))
    assert trial_lr(study, [5]) == 2e-3  # the better of the two trials of layer 5
    assert trial_lr(study, [4, 2]) == 5e-4
    assert trial_lr(study, [7]) is None and trial_lr(None, [5]) is None
    config = tiny_config(ORGANISM, tmp_path)
    assert config.train.lr == 3e-2 and train_lr(config) == 3e-2  # set in the YAML: it wins
    config.train.lr = None
    assert train_lr(config) == config.proxy.lr  # nothing measured: the proxy's lr
    with pytest.raises(AutolayerError, match="train.lr must be positive"):
        config_from_dict({"train": {"lr": -1.0}})


def test_train_keeps_bf16_master_weights_when_asked(tmp_path: Path) -> None:
    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.master_weights = "bfloat16"
    config.tracking.enabled = False
    result = run_training(config, [3], "only", root=tmp_path, out_dir=tmp_path / "out")
    trained = AutoModelForCausalLM.from_pretrained(result.model_dir)
    for name, w in trained.named_parameters():
        if name.startswith("model.layers.3."):
            assert torch.equal(w, w.to(torch.bfloat16).float()), name


def test_reference_measures_c_at_the_runs_own_horizon(tmp_path: Path) -> None:
    """--reference trains all layers with the same recipe and steps: C comes from that run."""
    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.beta, config.proxy.full_lr = 0.0, 1e-3
    config.tracking.enabled = False
    config.train.steps = 3
    result = run_training(
        config, [7], "only", root=tmp_path / "root", out_dir=tmp_path / "out", reference=True
    )
    c = result.contribution
    assert c is not None and "at this run's horizon (3 steps)" in result.contribution_note
    assert c.gain == pytest.approx(result.after.score - result.before.score)
    full_score = result.before.score + c.full_gain
    assert f"score {full_score:.3f}" in result.contribution_note
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["contribution_note"] == result.contribution_note
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "delta",
        "model",
        "train_summary.json",
    ]  # fmt: skip  (the reference run leaves nothing behind)


def test_the_kl_reference_shares_every_frozen_tensor_and_copies_the_trained_ones(
    tmp_path: Path,
) -> None:
    from autolayer.train import build_trainer

    config = tiny_config(ORGANISM, tmp_path)  # beta 0.04
    model, tokenizer = load_model(ORGANISM, device="cpu")
    task = load_task(config.task, tokenizer)
    groups = freeze_for_strategy(model, "only", [3], 1e-3, 0.0)
    trainer = build_trainer(model, tokenizer, task, grpo_args(config, task, tmp_path), groups, [])
    reference = trainer.ref_model
    assert reference is not None and reference is not model
    trained = set(layer_param_names(model, [3]))
    for (name, param), (ref_name, ref_param) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert name == ref_name and not ref_param.requires_grad
        assert (ref_param is param) == (name not in trained), name  # shared iff frozen
    copied = sum(p.numel() for n, p in reference.named_parameters() if n in trained)
    assert copied == 61_600  # one organism layer: the reference's only extra memory
    weight = dict(model.named_parameters())["model.layers.3.mlp.up_proj.weight"]
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # a training step moves the policy, never the reference
    assert torch.equal(
        dict(reference.named_parameters())["model.layers.3.mlp.up_proj.weight"], original
    )


def test_kl_training_runs_on_a_checkpoint_without_architectures(tmp_path: Path) -> None:
    """TRL's own reference reload needs `architectures` in config.json; ours does not."""
    import shutil

    local = tmp_path / "model"
    shutil.copytree(resolve_model_path(ORGANISM), local)
    cfg = json.loads((local / "config.json").read_text())
    cfg.pop("architectures", None)
    (local / "config.json").write_text(json.dumps(cfg))
    config = tiny_config(str(local), tmp_path)
    config.tracking.enabled = False
    result = run_training(config, [3], "only", root=tmp_path / "root", out_dir=tmp_path / "out")
    assert result.trainable_params == 61_600


@pytest.mark.parametrize(
    ("processes", "micro", "expected"),
    [(1, None, (16, 16)), (2, None, (8, 8)), (2, 4, (8, 4)), (4, 8, (4, 4))],
)
def test_processes_share_one_global_batch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
    micro: int | None,
    expected: tuple[int, int],
) -> None:
    """4 prompts x G=4 = 16 completions per optimizer step, however many processes split it."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    config = tiny_config(ORGANISM, tmp_path)
    config.proxy.micro_batch_size = micro
    assert _per_process_batch(config) == expected  # (per process and step, per pass)


def test_a_batch_that_does_not_split_among_the_processes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    config = tiny_config(ORGANISM, tmp_path)
    with pytest.raises(AutolayerError, match=r"\(16\) must divide evenly among 3 processes"):
        grpo_args(config, load_task(config.task), tmp_path)


def test_train_under_accelerate_launch_with_two_cpu_processes(tmp_path: Path) -> None:
    """Two ranks over gloo train one model (DDP averages their gradients); only rank 0 writes
    the outputs and prints. The cap is a safety net for a hung rank, not a timing assertion."""
    import socket
    import subprocess
    import sys

    import yaml

    data = {
        "model": {"name": ORGANISM, "dtype": "float32"},
        "task": {"name": "organism", "train_size": 64, "eval_size": 32},
        "proxy": {"prompts_per_step": 4, "num_generations": 4, "beta": 0.04, "device": "cpu"},
        "train": {"steps": 2, "lr": 3e-3},
        "tracking": {"enabled": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
        "-m", "autolayer.cli", "train", "--config", "config.yaml", "--layers", "3", "--out", "out",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert output.count("trained layers 3") == 1  # rank 0 reports, rank 1 does not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "mlruns", "out"]
    trained = dict(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").named_parameters()
    )
    base, _ = load_model(ORGANISM, dtype="float32", device="cpu")
    chosen = set(layer_param_names(base, [3]))
    for name, param in base.named_parameters():
        assert torch.equal(trained[name], param) == (name not in chosen), name


def test_the_trl_recipe_loads_without_lightning() -> None:
    """`autolayer train` is TRL's recipe: importing it pulls in no Lightning (the proxy's loop)."""
    import subprocess
    import sys

    probe = "import sys, autolayer.train; print(sorted(m for m in sys.modules if 'lightning' in m))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_reference_of_a_bf16_model_keeps_its_trained_copies_in_bf16() -> None:
    """`boost` trains every weight in fp32: a reference left in fp32 would be twice the model."""
    from autolayer.train import frozen_sharing_copy, set_dtype

    model, _ = load_model(ORGANISM, dtype="bfloat16", device="cpu")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze_for_strategy(model, "boost", [3], 1e-3, 1e-4)  # every layer trains
    set_dtype(model, torch.float32, only_trainable=True)
    reference = frozen_sharing_copy(model, torch.bfloat16)
    for name, param in reference.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, original[name]), name


@pytest.mark.parametrize(
    ("env", "device", "cuda", "expected"),
    [
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "auto", True, "cuda:2"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "cuda", True, "cuda:2"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "cpu", True, "cpu"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "auto", False, "auto"),  # CPU ranks over gloo
        ({}, "auto", True, "auto"),  # one process: the usual resolution
    ],
)
def test_each_rank_loads_onto_its_own_gpu(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], device: str, cuda: bool, expected: str
) -> None:
    from autolayer.train import rank_device

    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert rank_device(device, cuda) == expected
