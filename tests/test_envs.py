"""The environment contract, multi-turn rollouts, and the built-in grid world."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from autolayer import envs
from autolayer.agent import Turn, pack, play, render
from autolayer.agent_organism import MAX_TURNS, GridWorld, observation, pairs
from autolayer.config import TaskConfig
from autolayer.errors import AutolayerError
from autolayer.models import load_model
from autolayer.tasks import EVAL_SEED_OFFSET, Task, load_task


class Endless:
    """Never done: only max_turns ends its episodes."""

    def reset(self, seed: int) -> str:
        return f"s{seed}>"

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        return "s>", 0.0, False, {}


class RaisesInStep(Endless):
    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        raise ValueError("the door is locked")


class WrongTypes(Endless):
    def step(self, action: str) -> Any:
        return "s>", "one", False, {}


class NotATuple(Endless):
    def step(self, action: str) -> Any:
        return {"observation": "s>"}


class ResetsToNothing(Endless):
    def reset(self, seed: int) -> Any:
        return None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (RaisesInStep, "environment 'RaisesInStep' raised ValueError in step: the door is locked"),
        (WrongTypes, "environment 'WrongTypes' step returned the reward 'one'"),
        (NotATuple, "environment 'NotATuple' step returned dict, not \\(observation, reward"),
        (ResetsToNothing, "environment 'ResetsToNothing' reset returned NoneType"),
    ],
)
def test_a_broken_environment_is_one_sentence_naming_its_class(env: type, message: str) -> None:
    with pytest.raises(AutolayerError, match=message):
        envs.check_env(env)


@pytest.fixture(scope="module")
def agent() -> tuple[Any, Any]:
    return load_model("agent_organism", device="cpu")


def env_task(factory: Any, **kwargs: Any) -> Task:
    empty: Any = None
    fields: dict[str, Any] = {"max_turns": 3, "max_completion_length": 2, **kwargs}
    return Task("t", empty, empty, (), env=factory, **fields)


def test_max_turns_always_bounds_a_rollout(agent: tuple[Any, Any]) -> None:
    model, tokenizer = agent
    episodes = play(model, tokenizer, env_task(Endless), [0, 1], [0, 1], do_sample=True)
    assert [len(e.turns) for e in episodes] == [3, 3]
    assert [e.turns[0].observation for e in episodes] == ["s0>", "s1>"]  # the anchor states


def test_a_group_starts_from_one_state_and_actions_are_the_only_loss(
    agent: tuple[Any, Any],
) -> None:
    model, tokenizer = agent
    task = env_task(GridWorld, max_turns=MAX_TURNS)
    torch.manual_seed(0)
    episodes = play(model, tokenizer, task, [7] * 4, [0] * 4, do_sample=True)
    assert len({e.turns[0].observation for e in episodes}) == 1
    turns = [t for e in episodes for t in e.turns]
    input_ids, attention, prompt_len, mask = pack(tokenizer, turns, torch.device("cpu"))
    assert input_ids.shape == (len(turns), prompt_len + mask.shape[1])
    for row, turn in enumerate(turns):
        produced = int(mask[row].sum())
        assert produced == len(turn.action_ids) >= 1  # the move and its EOS, nothing else
        assert input_ids[row, prompt_len : prompt_len + produced].tolist() == turn.action_ids
        prompt = tokenizer.decode(input_ids[row, :prompt_len], skip_special_tokens=True)
        assert prompt == turn.observation  # history_turns 0: the current observation only
    assert attention[:, prompt_len:].sum() == mask.sum()


def test_render_shows_the_last_turns_as_text_or_chat() -> None:
    history = [("o1>", "l"), ("o2>", "r")]
    assert render(env_task(Endless, history_turns=1), history, "o3>") == "o2>r\no3>"
    assert render(env_task(Endless), history, "o3>") == "o3>"
    template = "You did:\n{history}Now: {observation}"
    templated = env_task(Endless, history_turns=2, turn_template=template)
    assert render(templated, history, "o3>") == "You did:\no1>l\no2>r\nNow: o3>"
    bad = TaskConfig(name="g", env="autolayer.agent_organism.GridWorld", prompt_template="{x}")
    with pytest.raises(AutolayerError, match="may use only \\{history\\} and \\{observation\\}"):
        load_task(bad)
    chat = render(env_task(Endless, history_turns=5, chat_template="always"), history, "o3>")
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    assert chat[-1]["content"] == "o3>"


def test_gridworld_is_deterministic_bounded_and_walled() -> None:
    env = GridWorld()
    first = env.reset(3)
    assert GridWorld().reset(3) == first and env.pos != env.goal
    env.pos, env.goal = (0, 0), (2, 0)
    assert env.step("u") == (observation((0, 0), (2, 0)), 0.0, False, {"valid": True})  # wall
    assert env.step("jump")[3] == {"valid": False}
    assert env.step("r")[1:3] == (0.0, False)
    assert env.step("r")[1:3] == (1.0, True)
    env.reset(4)
    env.pos, env.goal = (0, 0), (4, 4)  # "u" never gets there: only the turn limit ends it
    dones = [env.step("u")[2] for _ in range(MAX_TURNS)]
    assert dones == [False] * (MAX_TURNS - 1) + [True]


def test_gridworld_holds_out_its_eval_pairs() -> None:
    train, held_out = set(pairs("train")), set(pairs("eval"))
    assert not train & held_out and 60 <= len(held_out) <= 150
    env = GridWorld()
    for seed in range(50):
        env.reset(EVAL_SEED_OFFSET + seed)
        assert (env.pos, env.goal) in held_out
        env.reset(seed)
        assert (env.pos, env.goal) in train


def test_a_user_environment_from_a_file_with_kwargs(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "agent_env" / "corridor.py"
    task = load_task(
        TaskConfig(name="corridor", env=f"{example}:Corridor", env_kwargs={"length": 4},
                   eval_size=5, max_turns=2)
    )  # fmt: skip
    assert list(task.eval["seed"]) == [EVAL_SEED_OFFSET + i for i in range(5)]
    assert isinstance(task.env, functools.partial) and task.env.keywords == {"length": 4}
    env = envs.make(task.env)
    assert env.reset(1).startswith("at ") and env.length == 4  # type: ignore[attr-defined]
    with pytest.raises(AutolayerError, match="environment 'nope.py:Env': the file"):
        load_task(TaskConfig(name="x", env="nope.py:Env"))


def test_gigpo_needs_an_environment_task() -> None:
    from autolayer.config import config_from_dict
    from autolayer.loading import prepare_task

    config = config_from_dict({"proxy": {"algorithm": "gigpo"}, "task": {"eval_size": 4}})
    with pytest.raises(AutolayerError, match="gigpo needs a multi-turn environment task"):
        prepare_task(config)


def test_turn_is_a_plain_record() -> None:
    turn = Turn("p", "o", [1, 2], "l", 0.0)
    assert (turn.prompt, turn.action) == ("p", "l")
