"""The final RL run: train the chosen layers with TRL's GRPOTrainer and ship the result.

The proxy search ranks layers with short runs; this trains the winners for real, with the same
freezing code (`freeze_except`) and the same objective (TRL's `grpo` / `dr_grpo` losses; Dr. GRPO
is arXiv 2503.20783), scores the model before and after on the same held-out prompts, and writes a
normal HF model directory plus a delta of the chosen layers (`autolayer.delta`). Strategies
(arXiv 2607.01232): `only` trains the study's best k layers, `mid` the k middle layers, `boost`
trains everything with the best k layers at a higher learning rate.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from unittest import mock

import optuna
import torch
from torch import nn
from transformers import TrainerCallback

from autolayer.config import STRATEGIES, Config
from autolayer.delta import MANIFEST_FILE, hash_parameters, save_delta
from autolayer.errors import AutolayerError, Interrupted
from autolayer.files import atomic_dir
from autolayer.layers import middle_layers, validate_layers
from autolayer.loading import Workload, base_reference, load_for, prepare_task
from autolayer.models import (
    find_layer_stack,
    freeze_except,
    layer_param_names,
    resolve_device,
    store_as_bf16,
    trainable_parameters,
)
from autolayer.processes import is_main_process, process_rank
from autolayer.rollout import stop_criteria
from autolayer.scoring import Contribution, Evaluation, contribution, evaluate
from autolayer.study import StudyRecord, TrialRecord, ranked_trials
from autolayer.tasks import Task
from autolayer.tracking import DEFAULT_ROOT, Tracker, make_tracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerControl, TrainerState
    from trl import GRPOConfig, GRPOTrainer

SUMMARY_FILE = "train_summary.json"
DEFAULT_EXPERIMENT = "autolayer-train"
BOOST_NOTE = (
    "boost trained every parameter (the chosen layers at the higher lr), so this delta holds "
    "only the chosen layers and merging it into the base does NOT reproduce the trained model; "
    "use model/"
)


@dataclass(frozen=True)
class TrainResult:
    """What one final run did and where it wrote it."""

    layers: tuple[int, ...]
    strategy: str
    lr: float
    steps: int
    before: Evaluation  # the base model on the held-out prompts
    after: Evaluation  # the trained model on the same prompts
    contribution: Contribution | None  # vs the study's all-layers reference, when comparable
    contribution_note: str  # why C is missing or undefined ("" when defined)
    trainable_params: int
    seconds: float  # wall time of trainer.train()
    out_dir: Path
    run_id: str  # MLflow run id, "" with tracking off

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def delta_dir(self) -> Path:
        return self.out_dir / "delta"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE


# ---- which layers --------------------------------------------------------------------------------


def trial_lr(study: optuna.Study | None, layers: Sequence[int]) -> float | None:
    """The lr of the best complete trial that trained exactly `layers`, if the study has one."""
    if study is None:
        return None
    for record in map(TrialRecord.of, ranked_trials(study)):
        if sorted(record.layers) == sorted(layers) and record.lr is not None:
            return record.lr
    return None


def train_lr(config: Config) -> float:
    """`train.lr`, else the proxy's lr (what `run_training` resolves before it starts)."""
    return config.train.lr if config.train.lr is not None else config.proxy.lr


def select_layers(
    study: optuna.Study | None, strategy: str, top_k: int, num_layers: int
) -> tuple[int, ...]:
    """The layers a strategy trains, sorted.

    only / boost: the top_k best distinct layers of the study: trials ranked by value, each
    contributing its layers in that order, duplicates dropped. mid: the paper's Mid-k, no study.
    """
    if strategy not in STRATEGIES:
        raise AutolayerError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not 1 <= top_k <= num_layers:
        raise AutolayerError(f"top-k must be between 1 and the model's {num_layers} layers")
    if strategy == "mid":
        return middle_layers(num_layers, top_k)
    if study is None:
        raise AutolayerError(f"strategy {strategy} needs a study to rank layers or explicit layers")
    ranked = ranked_trials(study)
    if not ranked:
        raise AutolayerError(f"study '{study.study_name}' has no complete trials to rank layers by")
    chosen: list[int] = []
    for record in map(TrialRecord.of, ranked):
        chosen += [layer for layer in record.layers if layer not in chosen]
    if len(chosen) < top_k:
        raise AutolayerError(
            f"study '{study.study_name}' has complete trials for only {len(chosen)} distinct "
            f"layers ({', '.join(map(str, sorted(chosen)))}); lower top-k to at most {len(chosen)}"
        )
    return validate_layers(chosen[:top_k], num_layers)


def freeze_for_strategy(
    model: nn.Module, strategy: str, layers: Sequence[int], lr: float, base_lr: float
) -> list[dict[str, Any]]:
    """Set `requires_grad` for a strategy and return the optimizer's parameter groups.

    only / mid: exactly the chosen layers train (the proxy's `freeze_except`), one group at `lr`.
    boost: every parameter trains; the chosen layers at `lr`, the rest at `base_lr` ("Boost Bk").
    """
    if strategy in ("only", "mid"):
        freeze_except(model, layers)
        return [{"params": trainable_parameters(model), "lr": lr, "name": "chosen"}]
    if strategy != "boost":
        raise AutolayerError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    chosen = set(layer_param_names(model, layers))
    named = list(model.named_parameters())
    for _, param in named:
        param.requires_grad_(True)
    return [
        {"params": [p for n, p in named if n in chosen], "lr": lr, "name": "chosen"},
        {"params": [p for n, p in named if n not in chosen], "lr": base_lr, "name": "rest"},
    ]


def check_trainable(model: nn.Module, expected: set[str], optimizer: torch.optim.Optimizer) -> None:
    """The invariant: exactly `expected` requires grad and the optimizer holds exactly those."""
    actual = {name for name, p in model.named_parameters() if p.requires_grad}
    if actual != expected:
        extra, missing = sorted(actual - expected)[:3], sorted(expected - actual)[:3]
        raise RuntimeError(f"trainable set changed under the trainer: +{extra} -{missing}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    wanted = {id(p) for name, p in model.named_parameters() if name in expected}
    if held != wanted:
        raise RuntimeError("the optimizer does not hold exactly the trainable parameters")


# ---- TRL ---------------------------------------------------------------------------------------


def grpo_args(config: Config, task: Task, output_dir: Path) -> GRPOConfig:
    """GRPOConfig equivalent to one proxy step: `prompts_per_step` prompts x G completions.

    TRL's `per_device_train_batch_size` counts completions, not prompts, and one optimizer step
    consumes `per_device_train_batch_size * processes * gradient_accumulation_steps` of them.
    """
    from trl import GRPOConfig

    p = config.proxy
    device = resolve_device(p.device)
    per_process, micro = _per_process_batch(config)
    return GRPOConfig(
        output_dir=str(output_dir),
        loss_type=p.algorithm,  # our names are TRL's: "grpo" or "dr_grpo"
        scale_rewards="none" if p.algorithm == "dr_grpo" else "group",  # Dr. GRPO: no std division
        beta=p.beta,
        # the proxy's loss adds plain beta * k3 (rl.policy_loss); TRL 1.16 would otherwise weigh
        # the KL term by the importance ratio, a different objective from the one searched
        use_bias_correction_kl=False,
        epsilon=p.epsilon,
        num_generations=p.num_generations,
        # micro-batches accumulate to one step of prompts_per_step x G completions, so TRL still
        # generates once per optimizer step (steps_per_generation defaults to the accumulation)
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_process // micro,
        # every trainable parameter is used in every forward: skip DDP's extra graph traversal
        ddp_find_unused_parameters=False,
        num_iterations=p.num_iterations,
        max_completion_length=task.max_completion_length,
        max_steps=config.train.steps,
        learning_rate=train_lr(config),
        lr_scheduler_type="constant",  # as the proxy: a constant lr, no warmup
        weight_decay=0.0,
        max_grad_norm=p.max_grad_norm,
        temperature=p.temperature,
        top_p=1.0,
        top_k=0,
        disable_dropout=True,  # ratios of old and new log-probs must not differ by dropout noise
        activation_checkpointing=p.gradient_checkpointing,
        # reentrant checkpointing gives frozen early layers no grad-requiring input: no gradients
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device.type == "cpu",
        # mixed precision over fp32 trained weights; the Trainer refuses bf16 on CPU
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        # the same reward combination as the proxy and the scorer
        reward_weights=list(task.reward_weights) if task.reward_weights else None,
        use_vllm=False,
        report_to="none",  # we log to MLflow ourselves (TrackerCallback)
        logging_steps=1,
        save_strategy="no",
        seed=p.seed,
    )


def _per_process_batch(config: Config) -> tuple[int, int]:
    """(completions per process per optimizer step, per forward pass): one step consumes
    prompts_per_step x G completions however many processes share it, so N processes train on
    the same global batch as one (each with 1/N of it, gradients averaged)."""
    p = config.proxy
    _, processes = process_rank()
    total = p.prompts_per_step * p.num_generations
    if total % processes:
        raise AutolayerError(
            f"prompts_per_step x num_generations ({total}) must divide evenly among "
            f"{processes} processes"
        )
    per_process = total // processes
    micro = min(p.micro_batch_size or per_process, per_process)
    if per_process % micro:
        raise AutolayerError(
            f"micro_batch_size ({micro}) must divide each process's {per_process} completions"
        )
    return per_process, micro


class TrackerCallback(TrainerCallback):
    """Forwards the Trainer's numeric logs to the tracker as `train/<key>` at the global step."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        metrics = {
            f"train/{key}": float(value)
            for key, value in (logs or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics, step=state.global_step)


def build_trainer(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    args: GRPOConfig,
    groups: list[dict[str, Any]],
    callbacks: list[TrainerCallback],
    reference_dtype: torch.dtype | None = None,
) -> GRPOTrainer:
    """A GRPOTrainer stepping our parameter groups (TRL would build one group of all trainables).

    With beta > 0 its KL reference is `frozen_sharing_copy(model, reference_dtype)`: pass the
    model's dtype from before its trained weights were cast to fp32, or `boost` (every layer
    trained) would keep an fp32 reference, twice a bf16 model."""
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=0.0)
    return _grpo_trainer(model, tokenizer, task, args, callbacks, optimizer, reference_dtype)


def rank_device(device: str, cuda: bool) -> str:
    """Under a distributed launcher each process loads the model onto its own GPU (LOCAL_RANK),
    not every one onto cuda:0 for the Trainer to move later."""
    _, processes = process_rank()
    if processes > 1 and cuda and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def frozen_sharing_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The model as it is now, for the KL term's reference: every frozen tensor is shared with
    `model` and only the trainable ones are copied, as the proxy's reference keeps them.

    TRL (1.16) would instead reload a whole second model by `config._name_or_path`: twice the
    memory for a few trained layers, and a crash on a local checkpoint whose config lacks
    `architectures`, which the policy itself loads fine.
    """
    memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in model.buffers()})
    reference = copy.deepcopy(model, memo)
    reference.requires_grad_(False)
    if dtype is not None:  # the trained copies back in the base dtype, exactly (they were cast up)
        for param in reference.parameters():
            if id(param) not in memo and param.is_floating_point():
                param.data = param.data.to(dtype)
    return reference.eval()


@contextlib.contextmanager
def _reference_given(reference: nn.Module | None) -> Iterator[None]:
    """While TRL builds its trainer, its reference loader returns `reference` (TRL has no
    argument for a ready reference model)."""
    if reference is None:
        yield
        return
    from trl.trainer import grpo_trainer

    with mock.patch.object(grpo_trainer, "create_model_from_path", lambda *_, **__: reference):
        yield


def _grpo_trainer(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    args: GRPOConfig,
    callbacks: list[TrainerCallback],
    optimizer: torch.optim.Optimizer,
    reference_dtype: torch.dtype | None,
) -> GRPOTrainer:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    reward_funcs: list[Any] = list(task.reward_funcs)
    if task.stop_strings:
        # TRL's generate call has no way to pass stop strings' criteria (transformers needs the
        # tokenizer for them): bind the proxy's criteria on this model instance, which the
        # trainer generates with, so training stops where the proxy and the scorer stop
        criteria = stop_criteria(tokenizer, task.stop_strings)
        hf: Any = model
        hf.generate = functools.partial(hf.generate, stopping_criteria=criteria)
    reference = frozen_sharing_copy(model, reference_dtype) if args.beta != 0.0 else None
    with _reference_given(reference):
        trainer = GRPOTrainer(
            model=cast("PreTrainedModel", model),
            processing_class=tokenizer,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=task.train,
            callbacks=callbacks,
            optimizers=(optimizer, None),  # the Trainer adds the (constant) scheduler
        )
    built = trainer.ref_model and trainer.accelerator.unwrap_model(trainer.ref_model)
    if reference is not None and built is not reference:
        raise AutolayerError("this TRL version builds its own reference model; install trl==1.16")
    # With logging_steps=1 the stock callbacks print every step's log dict; the metrics go to
    # MLflow, so keep the step bar and drop the dumps.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress)
    return trainer


class Bf16MasterWeights(TrainerCallback):
    """After every optimizer step, store the trained weights as bf16 would (the proxy's
    `master_weights: bfloat16`, Gate III of arXiv 2511.08567)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        store_as_bf16(self.params)


class _QuietProgress(TrainerCallback):
    """transformers' step progress bar without its per-step log printing."""

    def __init__(self) -> None:
        from transformers.trainer_callback import ProgressCallback

        self._bar = ProgressCallback()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bar.on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bar.on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bar.on_train_end(args, state, control, **kwargs)


@torch.no_grad()
def set_dtype(model: nn.Module, dtype: torch.dtype, only_trainable: bool) -> None:
    """Cast parameters in place, keeping the Parameter objects (the optimizer holds them).

    Trained parameters run in fp32 while frozen ones may stay bf16: an optimizer stepping bf16
    weights drops every update below half a ULP (arXiv 2511.08567, Gate III), as in the proxy.
    """
    for param in model.parameters():
        if param.dtype != dtype and (param.requires_grad or not only_trainable):
            param.data = param.data.to(dtype)


# ---- references and tracking ---------------------------------------------------------------------


def contribution_vs_study(
    after: Evaluation, before: Evaluation, study: optuna.Study | None, seed: int
) -> tuple[Contribution | None, str]:
    """C against the study's all-layers reference, when it was measured on the same prompts."""
    if study is None:
        return None, "no study given, so there is no all-layers reference for C"
    record = StudyRecord.of(study)
    base, full = record.base_outcomes, record.full_outcomes
    if base is None or full is None:
        return None, f"study '{study.study_name}' has no all-layers reference yet"
    if len(full) != len(after.outcomes) or base != before.outcomes:
        return None, (
            f"study '{study.study_name}' scored a different held-out set (task or eval settings "
            "differ), so C would compare unlike things"
        )
    base_eval, full_eval = Evaluation.from_outcomes(base), Evaluation.from_outcomes(full)
    c = contribution(after, base_eval, full_eval, seed=seed)
    steps = record.proxy_steps
    horizon = (
        f"against the study's all-layers run of {steps} proxy steps, shorter than this run: "
        "--reference measures C at this run's horizon"
        if steps
        else "against the study's all-layers proxy run"
    )
    return c, c.reason or horizon


def start_tracking(
    config: Config, study: optuna.Study | None, root: Path, params: Mapping[str, Any]
) -> tuple[Tracker, str]:
    """A top-level run in the study's experiment, tagged with the study and its parent run.

    Not nested under the study's parent run: the final model is a result of its own. Without an
    explicit URI the run goes to the tracking store the study recorded.
    """
    experiment = config.tracking.experiment or (study.study_name if study else DEFAULT_EXPERIMENT)
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and study is not None:
        uri = StudyRecord.of(study).tracking_uri or None
    tracker = make_tracker(config.tracking.enabled, uri, experiment, root)
    tracker.end_dead_runs("train")  # runs of train commands that were killed stay RUNNING
    tags = {"autolayer.role": "train", "autolayer.strategy": str(params["strategy"])}
    if study is not None:
        tags["autolayer.study"] = study.study_name
        parent = StudyRecord.of(study).parent_run_id
        if parent:
            tags["autolayer.parent_run"] = str(parent)
    name = f"train {params['strategy']} layers={params['layers']}"
    run_id = tracker.start_run(name, tags=tags)
    tracker.log_params(run_id, params)
    tracker.log_dict(run_id, config.to_dict(), "config.yaml")
    return tracker, run_id


def run_params(
    config: Config,
    layers: Sequence[int],
    strategy: str,
    study: optuna.Study | None,
    task_name: str,
) -> dict[str, Any]:
    p = config.proxy
    params: dict[str, Any] = {
        "layers": ",".join(map(str, layers)),
        "strategy": strategy,
        "lr": train_lr(config),
        "steps": config.train.steps,
        "model": config.model.name,
        "revision": config.model.revision,
        "task": task_name,
        "algorithm": p.algorithm,
        "beta": p.beta,
        "num_generations": p.num_generations,
        "prompts_per_step": p.prompts_per_step,
        "seed": p.seed,
        "study": study.study_name if study else None,
    }
    if strategy == "boost":
        params["boost_base_lr"] = config.train.boost_base_lr
    return params


def final_metrics(
    before: Evaluation, after: Evaluation, c: Contribution | None
) -> dict[str, float]:
    metrics = {
        "final/score_before": before.score,
        "final/score_after": after.score,
        "final/gain": after.score - before.score,
        "final/stderr_after": after.stderr,
    }
    if c is not None and c.value is not None:
        metrics["final/contribution"] = c.value
        metrics["final/contribution_ci_low"] = cast(float, c.low)
        metrics["final/contribution_ci_high"] = cast(float, c.high)
    return metrics


# ---- the run -------------------------------------------------------------------------------------


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    """Fail fast, before any work, on an output directory that would be refused at the end."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AutolayerError(
            f"output directory {out_dir} already exists and is not empty; choose another or "
            "allow overwriting (--overwrite)"
        )


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A non-main rank's working directory: removed at the end, nothing of it is kept."""
    with tempfile.TemporaryDirectory(prefix="autolayer-rank-") as tmp:
        yield Path(tmp)


def settle(model: nn.Module, base_dtype: torch.dtype) -> None:
    """After training: nothing requires grad and every weight is back in the base dtype."""
    for param in model.parameters():
        param.requires_grad_(False)
    set_dtype(model, base_dtype, only_trainable=False)


def _train(
    work: Workload,
    config: Config,
    strategy: str,
    layers: tuple[int, ...],
    work_dir: Path,
    callbacks: list[TrainerCallback],
) -> tuple[int, float]:
    """Freeze, train and cast back to the base dtype; returns (trainable params, seconds)."""
    model, tokenizer, task = work
    base_dtype = next(model.parameters()).dtype
    lrs = train_lr(config), config.train.boost_base_lr
    groups = freeze_for_strategy(model, strategy, layers, *lrs)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    set_dtype(model, torch.float32, only_trainable=True)
    if config.proxy.master_weights == "bfloat16":
        callbacks = [*callbacks, Bf16MasterWeights(trainable_parameters(model))]
    use_cache = getattr(model.config, "use_cache", None)
    args = grpo_args(config, task, work_dir)
    trainer = build_trainer(model, tokenizer, task, args, groups, callbacks, base_dtype)
    optimizer = cast(torch.optim.Optimizer, trainer.optimizer)
    check_trainable(model, expected, optimizer)
    start = time.perf_counter()
    with warnings.catch_warnings():  # TRL 1.16 still calls the renamed is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        trainer.train()
    seconds = time.perf_counter() - start
    model.__dict__.pop("generate", None)  # the stop-criteria binding of _grpo_trainer
    check_trainable(model, expected, optimizer)
    del trainer, optimizer, groups  # optimizer state and the reference model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hf_model = cast("PreTrainedModel", model)
    if getattr(hf_model, "is_activation_checkpointing", False):
        hf_model.gradient_checkpointing_disable()
    if use_cache is not None:
        hf_model.config.use_cache = use_cache  # the Trainer turns the KV cache off for training
    settle(model, base_dtype)
    return sum(p.numel() for n, p in model.named_parameters() if n in expected), seconds


def _train_multiturn(
    work: Workload,
    config: Config,
    strategy: str,
    layers: tuple[int, ...],
    logger: Any,
) -> tuple[int, float, Evaluation]:
    """An environment task's final run: the proxy's multi-turn loop for `train.steps` steps.

    TRL's GRPOTrainer has no multi-turn environment loop that fits, so the chosen layers train
    through the same code path the search measured them with (GRPO, Dr. GRPO or GiGPO). Returns
    (trainable params, seconds, the held-out evaluation the run ends with).
    """
    if strategy == "boost":
        raise AutolayerError(
            "strategy boost trains every layer through TRL, which has no multi-turn environment "
            "loop; use only or mid for an environment task"
        )
    from autolayer.proxy import run_proxy

    base_dtype = next(work.model.parameters()).dtype
    steps = config.train.steps
    proxy = dataclasses.replace(config.proxy, steps=steps, eval_every=steps)
    result = run_proxy(work, proxy, layers, train_lr(config), logger=logger)
    trained = sum(p.numel() for p in trainable_parameters(work.model))
    settle(work.model, base_dtype)
    return trained, result.seconds, result.final


def _train_and_score(
    work: Workload,
    config: Config,
    strategy: str,
    layers: tuple[int, ...],
    work_dir: Path,
    callbacks: list[TrainerCallback],
    logger: Any,
) -> tuple[int, float, Evaluation]:
    """Train (TRL, or the multi-turn loop for an environment task) and score on the held-out set:
    (trainable params, seconds, evaluation after)."""
    if work.task.env is not None:
        return _train_multiturn(work, config, strategy, layers, logger)
    trained, seconds = _train(work, config, strategy, layers, work_dir, callbacks)
    shutil.rmtree(work_dir, ignore_errors=True)
    return trained, seconds, evaluate(*work)


def _contribution_at_horizon(
    config: Config, task: Task, before: Evaluation, after: Evaluation, work_dir: Path
) -> tuple[Contribution, str]:
    """C against all layers trained with the same recipe and steps, at `proxy.full_lr`."""
    ref_config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, lr=config.proxy.full_lr)
    )
    work = load_for(ref_config, task)
    everything = tuple(range(len(find_layer_stack(work.model))))
    _, _, full = _train_and_score(work, ref_config, "only", everything, work_dir, [], None)
    del work
    gc.collect()
    c = contribution(after, before, full, seed=config.proxy.seed)
    horizon = (
        f"at this run's horizon ({config.train.steps} steps) against all layers trained as long "
        f"(lr {config.proxy.full_lr:g}, score {full.score:.3f})"
    )
    return c, f"{c.reason} ({horizon})" if c.reason else horizon


def _write_outputs(
    tmp: Path,
    model: nn.Module,
    tokenizer: Any,
    config: Config,
    layers: tuple[int, ...],
    strategy: str,
    base_hashes: Mapping[str, str],
    summary: Mapping[str, Any],
) -> None:
    cast("PreTrainedModel", model.eval()).save_pretrained(tmp / "model")
    cast("PreTrainedTokenizerBase", tokenizer).save_pretrained(tmp / "model")
    save_delta(
        model,
        layers,
        tmp / "delta",
        config.model.name,
        config.model.revision,
        base_hashes=base_hashes,
    )
    if strategy == "boost":  # the manifest ignores unknown keys; say what the delta is not
        manifest_path = tmp / "delta" / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["note"] = BOOST_NOTE
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _summary(
    config: Config, result: TrainResult, study: optuna.Study | None, task_name: str
) -> dict[str, Any]:
    c = result.contribution  # an undefined C has value, low and high all None
    value, low, high = (c.value, c.low, c.high) if c is not None else (None, None, None)
    return {
        "model": config.model.name,
        "revision": config.model.revision,
        "task": task_name,
        "layers": list(result.layers),
        "strategy": result.strategy,
        "lr": result.lr,
        "boost_base_lr": config.train.boost_base_lr if result.strategy == "boost" else None,
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "eval_prompts": len(result.after.outcomes),
        "score_before": result.before.score,
        "score_after": result.after.score,
        "stderr_before": result.before.stderr,
        "stderr_after": result.after.stderr,
        "contribution": value,
        "contribution_ci_low": low,
        "contribution_ci_high": high,
        "contribution_note": result.contribution_note,
        "delta_reproduces_model": result.strategy != "boost",
        "study": study.study_name if study else None,
        "mlflow_run_id": result.run_id or None,
        "seconds": round(result.seconds, 2),
    }


def run_training(
    config: Config,
    layers: Sequence[int],
    strategy: str,
    *,
    study: optuna.Study | None = None,
    root: Path = DEFAULT_ROOT,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    task: Task | None = None,
    reference: bool = False,
) -> TrainResult:
    """Train `layers` by `strategy` with TRL's GRPOTrainer; write model/, delta/ and a summary.

    `task` replaces the one `config.task` describes (the Python way to bring your own task).

    C is measured against the study's all-layers run, which is as long as a proxy run; with
    `reference`, all layers are also trained here with the same recipe, steps and seed at
    `proxy.full_lr`, and C is measured at this run's own horizon against that (a second copy of
    the model is loaded for it).

    `out_dir` (default `config.train.output_dir`) is built beside itself and renamed into place,
    so a failed run leaves nothing half-written; an existing non-empty one needs `overwrite`.
    """
    if strategy not in STRATEGIES:
        raise AutolayerError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    out = Path(out_dir if out_dir is not None else config.train.output_dir)
    refuse_existing(out, overwrite)
    main = is_main_process()  # under a distributed launcher only rank 0 tracks and writes
    if not main:
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, enabled=False)
        )
    device = rank_device(config.proxy.device, torch.cuda.is_available())
    if device != config.proxy.device:
        torch.cuda.set_device(torch.device(device))
        config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, device=device))
    if config.train.lr is None:  # train what the search measured: its trial's lr
        found = trial_lr(study, layers)
        lr = found if found is not None else config.proxy.lr
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr))
    work = load_for(config, prepare_task(config, task))
    model, tokenizer, task = work
    if task.env is not None and (process_rank()[1] > 1 or config.proxy.devices > 1):
        raise AutolayerError(
            f"task {task.name!r} trains in the multi-turn loop, which runs in one process; "
            "launch it without torchrun or accelerate"
        )
    chosen = validate_layers(layers, len(find_layer_stack(model)))
    before = base_reference(config, work, root)
    base_hashes = hash_parameters(model, layer_param_names(model, chosen))
    params = run_params(config, chosen, strategy, study, task.name)
    tracker, run_id = start_tracking(config, study, root, params)
    try:
        with atomic_dir(out, overwrite) if main else _scratch_dir() as tmp:
            callbacks: list[TrainerCallback] = [TrackerCallback(tracker, run_id)]
            logger = tracker.lightning_logger(run_id)
            trained, seconds, after = _train_and_score(
                work, config, strategy, chosen, tmp / "trainer", callbacks, logger
            )
            c: Contribution | None
            if reference:
                c, note = _contribution_at_horizon(config, task, before, after, tmp / "reference")
                tracker.set_tags(run_id, {"contribution_reference": "all layers, same horizon"})
            else:
                c, note = contribution_vs_study(after, before, study, config.proxy.seed)
            result = TrainResult(
                chosen,
                strategy,
                train_lr(config),
                config.train.steps,
                before,
                after,
                c,
                note,
                trained,
                seconds,
                out,
                run_id,
            )
            if main:
                _write_outputs(
                    tmp,
                    model,
                    tokenizer,
                    config,
                    chosen,
                    strategy,
                    base_hashes,
                    _summary(config, result, study, task.name),
                )
    except BaseException as err:
        killed = isinstance(err, (KeyboardInterrupt, Interrupted))
        tracker.end_run(run_id, "KILLED" if killed else "FAILED")
        raise
    tracker.log_metrics(run_id, final_metrics(before, after, c), step=config.train.steps)
    tracker.log_artifact(run_id, result.summary_path)
    tracker.end_run(run_id)
    return result
