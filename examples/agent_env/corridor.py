"""A user-written text environment for the bring-your-own-environment example.

Any class with `reset(seed) -> str` and `step(action) -> (observation, reward, done, info)` works;
name it in YAML as `task.env: corridor.py:Corridor` (or a dotted import path). This one is a
one-row corridor whose observations use the bundled agent organism's format (`at 13 goal 43>`),
so the bundled model can play it: walk left or right to the goal.
"""

import random


class Corridor:
    def __init__(self, length: int = 5, max_turns: int = 6) -> None:
        self.length = length
        self.max_turns = max_turns

    def observation(self) -> str:
        return f"at {self.pos}2 goal {self.goal}2>"

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)  # the same seed gives the same corridor: one GRPO group
        self.pos, self.goal = rng.sample(range(self.length), 2)
        self.turns = 0
        return self.observation()

    def step(self, action: str):
        move = {"l": -1, "r": 1}.get(action.strip(), 0)
        self.pos = min(max(self.pos + move, 0), self.length - 1)
        self.turns += 1
        reached = self.pos == self.goal
        return self.observation(), float(reached), reached or self.turns >= self.max_turns, {}
