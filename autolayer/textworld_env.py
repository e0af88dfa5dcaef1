"""TextWorld (Microsoft's text-game generator) as an autolayer environment, generated locally.

    task:
      env: autolayer.textworld_env.TextWorldEnv
      env_kwargs: {challenge: tw-simple, rewards: dense, goal: detailed}

Install it with `pip install textworld` (or `pip install autolayer[agents]`): it generates and
runs its games on this machine, with no download. Each seed is one game, generated on first use
(about 2 s) and cached under `game_dir`. The observation is the game's text (the objective and
room description at the start, then the feedback to each command), optionally followed by the
admissible commands; the reward is the change in the game's score; the episode ends when the
game does. TextWorld's challenges are `tw-simple`, `tw-coin_collector`, `tw-treasure_hunter`
and `tw-cooking`, each with its own settings (see `tw-make <challenge> --help`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

DEFAULT_GAME_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "autolayer/textworld"
)


class TextWorldEnv:
    def __init__(
        self,
        challenge: str = "tw-simple",
        game_dir: str | None = None,
        show_commands: bool = True,
        **settings: Any,
    ) -> None:
        import textworld
        import textworld.challenges

        if challenge not in textworld.challenges.CHALLENGES:
            known = ", ".join(sorted(textworld.challenges.CHALLENGES))
            raise ValueError(f"unknown TextWorld challenge {challenge!r}; known: {known}")
        self.challenge = challenge
        self.settings = {"rewards": "dense", "goal": "detailed", "test": False, **settings}
        self.game_dir = Path(game_dir) if game_dir else DEFAULT_GAME_DIR / challenge
        self.show_commands = show_commands
        self.env: Any = None
        self.score = 0

    def _game(self, seed: int) -> Path:
        """The compiled game of `seed`, generated once."""
        import textworld
        import textworld.challenges

        key = "-".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        path = self.game_dir / f"{zlib.crc32(key.encode()):08x}-{seed}.z8"  # stable across runs
        if not path.exists():
            self.game_dir.mkdir(parents=True, exist_ok=True)
            options = textworld.GameOptions()
            options.seeds = seed
            options.path = str(path)
            options.force_recompile = True
            make = textworld.challenges.CHALLENGES[self.challenge][1]
            textworld.generator.compile_game(make(dict(self.settings), options), options)
        return path

    def _text(self, state: Any, text: str) -> str:
        commands = getattr(state, "admissible_commands", None) or []
        if self.show_commands and commands:
            text += "\nAdmissible commands: " + ", ".join(commands)
        return text.strip() + "\n>"

    def reset(self, seed: int) -> str:
        import textworld

        if self.env is not None:
            self.env.close()
        infos = textworld.EnvInfos(
            admissible_commands=True, score=True, objective=True, description=True
        )
        self.env = textworld.start(str(self._game(seed)), infos)
        state = self.env.reset()
        self.score = 0
        return self._text(state, f"{state.objective}\n\n{state.description}")

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        state, score, done = self.env.step(action.strip() or "look")
        reward, self.score = float(score - self.score), score
        return self._text(state, state.feedback), reward, bool(done), {"score": score}
