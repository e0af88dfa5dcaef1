"""One proxy RL run: GRPO / Dr. GRPO on PyTorch Lightning that steps only the chosen decoder layers.

Gradients flow through the whole network; only the chosen blocks' parameters are in the optimizer
and require grad. Held-out scores are computed in Lightning's validation loop every `eval_every`
steps, so pruning callbacks and any Lightning logger see them by global step.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autolayer import agent, frozen, prefix, rl
from autolayer.config import ProxyConfig
from autolayer.loading import Workload
from autolayer.models import (
    find_layer_stack,
    freeze_except,
    layer_param_names,
    restore,
    snapshot,
    store_as_bf16,
    trainable_parameters,
)
from autolayer.prefix import position_ids
from autolayer.rewards import repeat_rows
from autolayer.rollout import Completions, complete
from autolayer.scoring import Evaluation, evaluate
from autolayer.task_rewards import score_completions
from autolayer.tasks import Task

EvalHook = Callable[[int, Evaluation], bool]  # (global_step, evaluation) -> stop the run?


class _Rows(Dataset):
    """A list of row dicts as a map-style dataset."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def _collate(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def training_rows(task: Task, steps: int, prompts_per_step: int, seed: int) -> list[dict[str, Any]]:
    """Exactly `steps` batches of prompts: shuffled epochs of the train split, seeded."""
    needed = steps * prompts_per_step
    data = task.train
    epochs = math.ceil(needed / len(data))
    order: list[int] = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(len(data), generator=generator).tolist()
    return [data[i] for i in order[:needed]]


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5 name, with the v4 one as fallback)."""
    kwargs = {"use_reentrant": False}
    hf: Any = model  # transformers' PreTrainedModel API, untyped from an nn.Module
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _weighted(parts: list[tuple[float, rl.LossOutput]]) -> rl.LossOutput:
    """The batch's loss and metrics from its micro-batches' (weight, output) pairs."""

    def total(key: str) -> torch.Tensor:
        return sum(w * getattr(o, key).detach() for w, o in parts)

    return rl.LossOutput(loss=total("loss"), kl=total("kl"), clip_fraction=total("clip_fraction"))


@torch.no_grad()
def upcast_trainable(model: nn.Module) -> None:
    """Keep trained parameters in fp32 while frozen ones may stay bf16.

    An optimizer stepping bf16 weights drops every update below half a ULP (~0.2-0.4% of the
    weight, Gate III of arXiv 2511.08567), which would understate what a layer can learn.
    Autocast runs the matmuls in bf16 either way; the extra memory is one fp32 copy of the
    trained layers.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


@dataclass
class ProxyResult:
    layers: tuple[int, ...]
    lr: float
    final: Evaluation
    steps: int
    seconds: float
    evals: list[tuple[int, float]] = field(default_factory=list)  # (global step, held-out score)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def score(self) -> float:
        return self.final.score


@dataclass
class Rollout:
    """A sampled batch as the loss takes it: `group` completions per prompt, prompt-major."""

    prompt_ids: torch.Tensor  # (B, P) one left-padded prompt per group
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, T), N = B x group, padding included
    mask: torch.Tensor  # (N, T) float: the tokens each completion really produced
    rewards: torch.Tensor  # (N,) a trajectory's return for agent turns
    group: int  # completions per prompt: G, or 1 for agent turns (each has its own history)
    common: int = 0  # leading prompt columns the same in every row: run once in the passes
    advantages: torch.Tensor | None = None  # given by the environment path (GiGPO)
    # the lowest trained layer's input as generation computed it: prompt states (N, P, H) and
    # completion states (N, T, H); None when generation could not keep it
    generated: tuple[torch.Tensor, torch.Tensor] | None = None

    def joined(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of `rows` as whole sequences, each prompt repeated."""
        ids = self.prompt_ids.repeat_interleave(self.group, dim=0)[rows]
        mask = self.prompt_mask.repeat_interleave(self.group, dim=0)[rows]
        return (
            torch.cat([ids, self.completion_ids[rows]], dim=1),
            torch.cat([mask, self.mask[rows].to(mask.dtype)], dim=1),
        )


def _generated_states(
    parts: list[torch.Tensor], done: Completions
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What generation handed the lowest trained layer, as (prompt states (N, P, H), completion
    states (N, T, H)): the prefill's prompt positions (when prompts were shared: the common
    prefix once, each distinct prompt's own columns once, then its last token per row), then
    one position per decoding step. The last sampled token never went through the model; its
    slot is zeros, which changes nothing scored (its logits predict past the completion, and
    causal attention hides it from every earlier position). None when generation ran in
    another layout."""
    rows, width = done.prompt_ids.shape
    shared, parts = done.shared, list(parts)
    try:
        if shared is None:
            prompt = parts.pop(0)
        else:
            pieces = [parts.pop(0).expand(shared.distinct, -1, -1)] if shared.common else []
            if width - 1 > shared.common:
                pieces.append(parts.pop(0))
            own = torch.cat(pieces, dim=1) if pieces else None
            if own is not None and shared.index is not None:
                own = own[shared.index]
            prompt = torch.cat([*([own] if own is not None else []), parts.pop(0)], dim=1)
    except (IndexError, RuntimeError):
        return None
    if prompt.shape[:2] != (rows, width) or any(p.shape[:2] != (rows, 1) for p in parts):
        return None
    if len(parts) != done.completion_ids.shape[1] - 1:
        return None
    completion = torch.cat([*parts, prompt.new_zeros(rows, 1, prompt.shape[2])], dim=1)
    return prompt, completion


def _has_dropout(model: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether the embeddings or `layers` drop anything out in training mode."""
    config = getattr(model, "config", None)
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    hf: Any = model
    parts = [hf.get_input_embeddings(), *layers]
    return any(isinstance(m, nn.Dropout) and m.p > 0 for part in parts for m in part.modules())


class GRPOModule(L.LightningModule):
    """GRPO / Dr. GRPO with manual optimisation over the chosen layers only."""

    share_prefix = True  # replay the frozen layers below the trained ones (tests turn it off)
    capture_prefix = True  # take their output from generation (tests and benchmarks turn it off)
    share_prompts = True  # each distinct prompt once in sampling and the passes (tests: off)

    def __init__(
        self,
        work: Workload,
        config: ProxyConfig,
        layers: Sequence[int],
        lr: float,
        states: frozen.FrozenStates | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        model = work.model
        self.model = model
        self.tokenizer = work.tokenizer
        self.task = work.task
        self.config = config
        self.lr = lr
        self.trainable_names = freeze_except(model, layers)
        self.stack = find_layer_stack(model)
        self.lowest = min(layers)
        # the study's prefills of the layers below this run's lowest one (`frozen.prefill_below`)
        self.frozen = (
            None if states is None else frozen.Frozen(states, self.stack.layers, self.lowest)
        )
        self._as_tuple: bool | None = None  # what a decoder layer returns, seen on first capture
        self.keeps_logits = prefix.keeps_logits(model)
        self._dropout_below = _has_dropout(model, list(self.stack.layers)[: self.lowest])
        upcast_trainable(model)
        self.rollouts = 0  # sampled batches done: the unit of `steps`, evals and pruning reports
        # (Lightning's global_step counts optimizer steps: num_iterations per batch)
        self.history: list[dict[str, float]] = []
        self.evals: list[tuple[int, Evaluation]] = []
        self.eval_hook: EvalHook | None = None
        self.stopped_early = False
        # The reference policy is not a second model: frozen layers are identical in policy and
        # reference, so only the trained layers' original weights are kept (one copy of those
        # layers, not of the model). `functional_call` swaps them in for the reference pass.
        params = dict(model.named_parameters())
        self.reference = (
            {n: params[n].detach().clone() for n in self.trainable_names} if config.beta > 0 else {}
        )
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing keeps gradients when the early layers are frozen
            # (reentrant checkpointing drops them if no checkpoint input requires grad).
            enable_checkpointing(model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable_parameters(self.model), lr=self.lr, weight_decay=0.0)

    def _reference_forward(self, **kwargs: Any) -> Any:
        """The model with the trained layers at their original weights (the KL reference)."""
        return torch.func.functional_call(self.model, self.reference, (), kwargs, strict=False)

    def _logprobs(
        self, input_ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, reference: bool = False
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids(mask),
        }
        if self.keeps_logits:
            # Only the positions that predict completion tokens need logits, as TRL asks for:
            # the LM head over the prompt positions is skipped instead of computed and sliced.
            kwargs["logits_to_keep"] = input_ids.shape[1] - prompt_len + 1
        out = self._reference_forward(**kwargs) if reference else self.model(**kwargs)
        logits = out.logits[:, -(input_ids.shape[1] - prompt_len) - 1 : -1]
        return rl.token_logprobs(logits, input_ids[:, prompt_len:], self.config.temperature)

    def _rollout(self, batch: dict[str, list[Any]]) -> Rollout:
        """Sample G completions per prompt and score them with the task's rewards."""
        cfg = self.config
        rows = repeat_rows(batch, cfg.num_generations)
        if self.task.env is not None:
            return self._play(rows["seed"])
        self.model.eval()
        parts: list[torch.Tensor] = []
        with self._capture_prefix(parts):
            done = complete(
                self.model, self.tokenizer, self.task, rows["prompt"], do_sample=True,
                temperature=cfg.temperature, share_prompts=self.share_prompts, frozen=self.frozen,
            )  # fmt: skip
        self.model.train()
        columns = {k: v for k, v in rows.items() if k != "prompt"}
        rewards = torch.tensor(
            score_completions(self.task, rows["prompt"], done.texts, columns, done.ids),
            dtype=torch.float32,
            device=self.device,
        )
        group = cfg.num_generations
        prompt_ids, prompt_mask = done.prompt_ids[::group], done.prompt_mask[::group]
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=done.completion_ids,
            mask=done.mask,
            rewards=rewards,
            group=group,
            common=prefix.common_length(prompt_ids, prompt_mask) if self.share_prompts else 0,
            generated=_generated_states(parts, done),
        )

    @contextmanager
    def _capture_prefix(self, parts: list[torch.Tensor]) -> Iterator[None]:
        """While sampling, keep what the frozen layers below the trained ones hand up.

        Generation already runs those layers over every prompt position (the prefill) and every
        sampled token (one position per decoding step), on the weights the passes below use, so
        the policy pass need not run them again: with beta = 0 and one iteration that pass is
        the only one, and the frozen-prefix cache has nothing else to save. Off when the frozen
        layers hold dropout, which is inactive in generation but not in the passes.
        """
        if not (self.capture_prefix and self._shares_prefix()) or self._dropout_below:
            yield
            return
        with self._watch_lowest(parts.append):
            yield

    @contextmanager
    def _watch_lowest(self, keep: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """While it lasts, `keep` gets the lowest trained layer's input (detached) on every
        forward; once it ends, `_as_tuple` says what a decoder layer returns (for
        `frozen.Passthrough`)."""
        watched = [self.lowest]
        with frozen.watching(self.stack.layers, watched, lambda _, hidden: keep(hidden)) as form:
            yield
        if form:
            self._as_tuple = form[0]

    def _shares_prefix(self) -> bool:
        # With micro-batches, keeping every one's hidden states would hold a full batch of
        # activations that micro-batching exists to avoid.
        return self.share_prefix and self.lowest > 0 and not self.config.micro_batch_size

    def _groups_prompts(self, roll: Rollout) -> bool:
        """Whether the passes run each prompt once per group (`prefix.grouped_logprobs`).

        Not where each prompt has one completion (agent turns), where a micro-batch would split
        a group, where the model takes no KV cache, or under activation checkpointing, which
        drops the cache in a pass with gradients (transformers' `GradientCheckpointingLayer`):
        those run the repeated sequences as before.
        """
        cfg = self.config
        return (
            self.share_prompts
            and roll.group > 1
            and (cfg.micro_batch_size or roll.group) % roll.group == 0
            and not cfg.gradient_checkpointing
            and prefix.cache_keyword(self.model) is not None
        )

    def _batch_logprobs(self, roll: Rollout, rows: slice, reference: bool = False) -> torch.Tensor:
        """Log-probs of the completions `rows` (N_rows, T), each prompt computed once per group
        where it can be, else as whole repeated sequences."""
        if not self._groups_prompts(roll):
            ids, attn = roll.joined(rows)
            return self._logprobs(ids, attn, roll.prompt_ids.shape[1], reference)
        groups = slice(rows.start // roll.group, rows.stop // roll.group)
        forward = self._reference_forward if reference else self.model
        return prefix.grouped_logprobs(
            self.model, forward, roll.prompt_ids[groups], roll.prompt_mask[groups],
            roll.completion_ids[rows], roll.mask[rows], self.config.temperature, roll.common,
        )  # fmt: skip

    def _replayed(self, roll: Rollout) -> dict[int, list[torch.Tensor]]:
        """The frozen-prefix cache seeded from generation, in the layout of the passes."""
        if roll.generated is None or not self._shares_prefix():
            return {}
        prompt, completion = roll.generated
        if self._groups_prompts(roll):
            own = prompt[:: roll.group]
            if roll.common:
                return {0: [own[:1, : roll.common], own[:, roll.common :], completion]}
            return {0: [own, completion]}
        return {0: [torch.cat([prompt, completion], dim=1)]}

    def _play(self, seeds: list[int]) -> Rollout:
        """G trajectories per seed; each action is a loss row with its trajectory's advantage
        (GRPO, Dr. GRPO) or GiGPO's episode-plus-step advantage."""
        cfg = self.config
        groups = [i // cfg.num_generations for i in range(len(seeds))]
        self.model.eval()
        episodes = agent.play(
            self.model, self.tokenizer, self.task, seeds, groups, do_sample=True,
            temperature=cfg.temperature,
        )  # fmt: skip
        self.model.train()
        turns = [turn for episode in episodes for turn in episode.turns]
        steps = [
            rl.AgentStep(e.group, j, turn.observation, turn.reward)
            for j, e in enumerate(episodes)
            for turn in e.turns
        ]
        if cfg.algorithm == "gigpo":
            advantages = rl.gigpo_advantages(steps, cfg.gigpo_gamma, cfg.gigpo_omega)
        else:
            advantages = rl.trajectory_advantages(steps, cfg.algorithm)
        input_ids, attention, prompt_len, mask = agent.pack(self.tokenizer, turns, self.device)
        returns = [e.total for e in episodes]
        return Rollout(
            prompt_ids=input_ids[:, :prompt_len],
            prompt_mask=attention[:, :prompt_len],
            completion_ids=input_ids[:, prompt_len:],
            mask=mask,
            rewards=torch.tensor(returns, dtype=torch.float32, device=self.device),
            group=1,
            advantages=advantages.to(self.device),
        )

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        cfg = self.config
        # gigpo reduces its loss as grpo does: the mean over each row (action), then over rows
        loss_algorithm: rl.Algorithm = "dr_grpo" if cfg.algorithm == "dr_grpo" else "grpo"
        start = time.perf_counter()
        roll = self._rollout(batch)
        advantages = roll.advantages
        if advantages is None:
            advantages = rl.group_advantages(roll.rewards, cfg.num_generations, loss_algorithm)
        rows_total = roll.completion_ids.shape[0]
        chunks = self._micro_batches(rows_total)
        # per micro-batch: the frozen layers' output, kept from generation when it could be
        replay = self._replayed(roll)
        with torch.no_grad():
            ref_logp = self._chunked_logprobs(roll, chunks, replay, True) if cfg.beta > 0 else None
            old_logp = (
                self._chunked_logprobs(roll, chunks, replay) if cfg.num_iterations > 1 else None
            )
        optimizer: Any = self.optimizers()  # one optimizer, configured below
        for _ in range(cfg.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            parts = []
            for rows in chunks:
                with self._frozen_prefix(replay, rows.start):
                    logp = self._batch_logprobs(roll, rows)
                out = rl.policy_loss(
                    logp,
                    logp.detach() if old_logp is None else old_logp[rows],
                    advantages[rows],
                    roll.mask[rows],
                    loss_algorithm,
                    epsilon=cfg.epsilon,
                    beta=cfg.beta,
                    ref_logp=None if ref_logp is None else ref_logp[rows],
                    max_completion_length=self.task.max_completion_length,
                )
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(
                        f"the loss became {out.loss.item()} at step {self.rollouts + 1}"
                    )
                # Both losses are means over sequences (grpo) or over N x L_max (dr_grpo), so a
                # micro-batch of n rows weighs n / N: the summed gradient is the full batch's.
                weight = (rows.stop - rows.start) / rows_total
                self.manual_backward(out.loss * weight)
                parts.append((weight, out))
            out = _weighted(parts)
            grad_norm = self._clip_gradients()
            optimizer.step()
            if cfg.master_weights == "bfloat16":
                store_as_bf16(trainable_parameters(self.model))
        self.rollouts += 1
        self._log_step(roll, out, grad_norm, time.perf_counter() - start)

    @contextmanager
    def _frozen_prefix(self, cache: dict[int, list[torch.Tensor]], key: int) -> Iterator[None]:
        """Compute the frozen layers below the lowest trained one once per micro-batch.

        Those layers see the same input with the same weights in the reference, old-policy and
        policy passes, so their output (the lowest trained layer's input) is the same in all of
        them: the first pass of a micro-batch keeps it, one tensor per forward (the grouped
        passes run two: prompts, then completions), the later ones swap the layers below for
        pass-throughs and feed the kept hidden states in, in the same order. Nothing below the
        lowest trained layer needs a gradient, so replaying a detached tensor changes no
        gradient.
        """
        if not self._shares_prefix():
            yield
            return
        if key not in cache:
            kept: list[torch.Tensor] = []
            with self._watch_lowest(kept.append):
                yield
            cache[key] = kept
            return
        layers, inputs = self.stack.layers, iter(cache[key])
        with frozen.replaying(layers, self.lowest, bool(self._as_tuple), inputs):
            yield

    def _micro_batches(self, n: int) -> list[slice]:
        """Row slices of at most `micro_batch_size` completions (all of them when unset)."""
        size = self.config.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _chunked_logprobs(
        self,
        roll: Rollout,
        chunks: list[slice],
        replay: dict[int, list[torch.Tensor]],
        reference: bool = False,
    ) -> torch.Tensor:
        parts = []
        for rows in chunks:
            with self._frozen_prefix(replay, rows.start):
                parts.append(self._batch_logprobs(roll, rows, reference))
        return torch.cat(parts)

    def _clip_gradients(self) -> torch.Tensor:
        params = trainable_parameters(self.model)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _log_step(
        self, roll: Rollout, out: rl.LossOutput, grad_norm: torch.Tensor, dt: float
    ) -> None:
        tokens = float(roll.mask.sum())
        rows = roll.completion_ids.shape[0]
        metrics = {
            "proxy/reward_mean": float(roll.rewards.mean()),
            "proxy/reward_std": float(roll.rewards.std()),
            "proxy/loss": float(out.loss.detach()),
            "proxy/kl": float(out.kl),
            "proxy/clip_fraction": float(out.clip_fraction),
            "proxy/grad_norm": float(grad_norm),
            "proxy/completion_length": tokens / rows,
            # every sequence position the step trained on, prompts counted per completion
            "proxy/tokens_per_second": (tokens + rows * roll.prompt_ids.shape[1]) / dt,
            "proxy/step_seconds": dt,
        }
        self.history.append({"step": float(self.rollouts), **metrics})
        self._log(metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        """Straight to the loggers at the rollout count: the step index of Optuna's reports and
        of the results table (Lightning's own step counts optimizer steps, num_iterations per
        rollout)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.rollouts)

    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        pass  # the held-out evaluation runs once per validation epoch, below

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        evaluation = evaluate(
            self.model, self.tokenizer, self.task, share_prompts=self.share_prompts,
            frozen=self.frozen,
        )  # fmt: skip
        self.evals.append((self.rollouts, evaluation))
        self._log({"proxy/eval_score": evaluation.score})
        if self.eval_hook is not None and self.eval_hook(self.rollouts, evaluation):
            self.stopped_early = True
            self.trainer.should_stop = True


def make_trainer(
    config: ProxyConfig,
    logger: Any = None,
    callbacks: list[Any] | None = None,
    progress: bool = False,
) -> L.Trainer:
    """bf16 autocast on CUDA, fp32 on CPU; validation every `eval_every` optimizer steps."""
    accelerator = (
        "gpu" if config.device.startswith("cuda") else "cpu" if config.device == "cpu" else "auto"
    )
    cuda = torch.cuda.is_available() and accelerator != "cpu"
    return L.Trainer(
        accelerator=accelerator,
        devices=config.devices,
        # DDP (gloo on CPU, NCCL on CUDA) averages the trained layers' gradients in backward;
        # every trainable parameter is used in every step, so no unused-parameter search
        strategy=DDPStrategy(find_unused_parameters=False) if config.strategy == "ddp" else "auto",
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=1,
        val_check_interval=min(config.eval_every, config.steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=not cuda,  # CPU runs reproduce exactly for a seed
    )


class ProxyRun(Protocol):
    """What trains one candidate: `run_proxy`, or a stand-in for it (the search's tests)."""

    def __call__(
        self,
        work: Workload,
        config: ProxyConfig,
        layers: Sequence[int],
        lr: float | None = None,
        *,
        keep: bool = True,
        eval_hook: EvalHook | None = None,
        logger: Any = None,
        progress: bool = False,
        states: frozen.FrozenStates | None = None,
    ) -> ProxyResult: ...


def run_proxy(
    work: Workload,
    config: ProxyConfig,
    layers: Sequence[int],
    lr: float | None = None,
    *,
    keep: bool = True,
    eval_hook: EvalHook | None = None,
    logger: Any = None,
    progress: bool = False,
    states: frozen.FrozenStates | None = None,
) -> ProxyResult:
    """Train `layers` of the model in place for `config.steps` steps and score the result.

    With `keep=False` the trained layers' values are put back afterwards, however the run ends
    (the search's trials share one model; only those layers are kept aside, not the model).
    `states`, a study's store of prefills below the trained layers (`frozen.FrozenStates`), is
    for runs that start from the base weights, as a search's trials do.
    """
    saved = None if keep else snapshot(work.model, layer_param_names(work.model, layers))
    try:
        return _fit(
            work, config, layers, config.lr if lr is None else lr, eval_hook, logger, progress,
            states,
        )  # fmt: skip
    finally:
        if saved is not None:
            restore(work.model, saved)


def _fit(
    work: Workload,
    config: ProxyConfig,
    layers: Sequence[int],
    lr: float,
    eval_hook: EvalHook | None,
    logger: Any,
    progress: bool,
    states: frozen.FrozenStates | None,
) -> ProxyResult:
    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    model, tokenizer, task = work
    module = GRPOModule(work, config, layers, lr, states)
    module.eval_hook = eval_hook
    rows = training_rows(task, config.steps, config.prompts_per_step, config.seed)
    # With N devices Lightning gives each process every N-th row (a DistributedSampler), so
    # a step's prompts_per_step prompts are split N ways: the global batch of one device.
    per_device = config.prompts_per_step // config.devices
    train = DataLoader(_Rows(rows), batch_size=per_device, shuffle=False, collate_fn=_collate)
    val = DataLoader(_Rows([{"prompt": ""}]), batch_size=1, collate_fn=_collate)
    start = time.perf_counter()
    trainer = make_trainer(config, logger=logger, progress=progress)
    trainer.fit(module, train, val)
    done = module.rollouts
    final = next((e for step, e in module.evals if step == done), None)
    if final is None:
        final = evaluate(
            model, tokenizer, task, share_prompts=module.share_prompts, frozen=module.frozen
        )
        module.evals.append((done, final))
    model.eval()
    return ProxyResult(
        layers=tuple(sorted(layers)),
        lr=lr,
        final=final,
        steps=done,
        seconds=time.perf_counter() - start,
        evals=[(s, e.score) for s, e in module.evals],
        history=module.history,
        stopped_early=module.stopped_early,
    )


def quiet_lightning() -> None:
    """Lightning's info banners (GPU available, TPU available...) would drown the search output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The policy is deliberately in eval mode between rollouts (no dropout in these models).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
