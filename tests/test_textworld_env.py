"""The TextWorld adapter on a game generated locally (opt-in: pip install textworld; -m slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autolayer import envs

pytestmark = pytest.mark.slow
textworld = pytest.importorskip("textworld")


def test_a_generated_game_obeys_the_environment_contract(tmp_path: Path) -> None:
    from autolayer.textworld_env import TextWorldEnv

    def make() -> TextWorldEnv:
        return TextWorldEnv("tw-simple", game_dir=str(tmp_path))

    envs.check_env(make)  # reset(0) and one step, typed
    env = make()
    first = envs.reset(env, 5)
    assert first.endswith(">") and "Admissible commands:" in first
    assert envs.reset(make(), 5) == first  # the same seed is the same game
    rewards, done, turns = [], False, 0
    while not done and turns < 3:
        _, reward, done = envs.step(env, "inventory")
        rewards.append(reward)
        turns += 1
    assert rewards == [0.0] * len(rewards)  # looking around scores nothing
    assert len(list(tmp_path.glob("*.z8"))) == 2  # seeds 0 and 5, generated once each


def test_the_agent_loop_plays_a_textworld_game(tmp_path: Path) -> None:
    import functools

    from autolayer.agent import play
    from autolayer.models import load_model
    from autolayer.tasks import Task
    from autolayer.textworld_env import TextWorldEnv

    model, tokenizer = load_model("code_organism", device="cpu")  # letters: it can "type"
    factory = functools.partial(TextWorldEnv, "tw-simple", game_dir=str(tmp_path))
    task = Task("tw", None, None, (), max_completion_length=4, env=factory, max_turns=2)  # type: ignore[arg-type]
    episodes = play(model, tokenizer, task, [1, 1], [0, 0], do_sample=True)
    assert [len(e.turns) for e in episodes] == [2, 2]
    assert episodes[0].turns[0].observation == episodes[1].turns[0].observation
