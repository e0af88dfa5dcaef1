"""Multi-turn rollouts of a text agent: trajectories, their prompts, and the rows of the loss.

Every action is one row of the policy loss, as in verl-agent: its prompt is the rendered history
(the last `task.history_turns` observation-action pairs and the current observation) and its
completion is the action the model sampled. Only action tokens carry loss; the history, the
observations and the template are the row's prompt, masked out like any prompt. All live
trajectories of a batch generate together, one turn at a time, until every one is done or
`task.max_turns` actions were taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autolayer import envs
from autolayer.rollout import complete
from autolayer.tasks import Task, prompt_text


@dataclass(frozen=True)
class Turn:
    prompt: Any  # what the model saw: text, or chat messages
    observation: str  # the observation this action answered (GiGPO's anchor state)
    action_ids: list[int]  # the tokens the model produced, through its first EOS
    action: str
    reward: float


@dataclass
class Trajectory:
    group: int  # trajectories of one group start from the same seed
    seed: int
    turns: list[Turn] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The episode return: the sum of its step rewards."""
        return sum(turn.reward for turn in self.turns)


def render(task: Task, history: Sequence[tuple[str, str]], observation: str) -> Any:
    """The prompt for the next action: `task.turn_template` over {history} (earlier pairs as
    `observation action` lines) and {observation}; by default the history then the observation;
    chat messages alternating user observations and assistant actions when the task uses the
    chat template."""
    recent = list(history[-task.history_turns :]) if task.history_turns > 0 else []
    if task.turn_template is not None:
        past = "".join(f"{seen}{done}\n" for seen, done in recent)
        return task.turn_template.format(history=past, observation=observation)
    if task.chat_template == "always":
        messages: list[dict[str, str]] = []
        for seen, done in recent:
            messages += [{"role": "user", "content": seen}, {"role": "assistant", "content": done}]
        return [*messages, {"role": "user", "content": observation}]
    return "".join(f"{seen}{done}\n" for seen, done in recent) + observation


@torch.no_grad()
def play(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    seeds: Sequence[int],
    groups: Sequence[int],
    *,
    do_sample: bool,
    temperature: float = 1.0,
) -> list[Trajectory]:
    """One trajectory per seed, at most `task.max_turns` actions each (an env that never ends
    is cut there)."""
    assert task.env is not None, "play needs an environment task"
    instances = [envs.make(task.env) for _ in seeds]
    trajectories = [Trajectory(g, s) for g, s in zip(groups, seeds, strict=True)]
    observations = [envs.reset(env, s) for env, s in zip(instances, seeds, strict=True)]
    histories: list[list[tuple[str, str]]] = [[] for _ in seeds]
    live = list(range(len(seeds)))
    for _ in range(task.max_turns):
        if not live:
            break
        prompts = [render(task, histories[i], observations[i]) for i in live]
        done_now = complete(
            model, tokenizer, task, prompts, do_sample=do_sample, temperature=temperature
        )
        ids, actions = done_now.ids, done_now.texts
        still = []
        for k, i in enumerate(live):
            observation, reward, done = envs.step(instances[i], actions[k])
            turn = Turn(prompts[k], observations[i], ids[k], actions[k], reward)
            trajectories[i].turns.append(turn)
            histories[i].append((observations[i], actions[k]))
            observations[i] = observation
            if not done:
                still.append(i)
        live = still
    return trajectories


def pack(
    tokenizer: Any, turns: Sequence[Turn], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(input_ids, attention_mask, prompt_len, action_mask) of the turns as loss rows: prompts
    left-padded as generation saw them, actions right-padded, loss only on action tokens."""
    enc = tokenizer(
        [prompt_text(t.prompt, tokenizer) for t in turns],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    width = max(1, max(len(t.action_ids) for t in turns))
    actions = torch.full((len(turns), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(turns), width), dtype=torch.float32)
    for row, turn in enumerate(turns):
        actions[row, : len(turn.action_ids)] = torch.tensor(turn.action_ids, dtype=torch.long)
        mask[row, : len(turn.action_ids)] = 1.0
    input_ids = torch.cat([enc["input_ids"], actions], dim=1).to(device)
    attention = torch.cat([enc["attention_mask"], mask.long()], dim=1).to(device)
    return input_ids, attention, enc["input_ids"].shape[1], mask.to(device)
