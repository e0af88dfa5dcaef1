"""The bundled agent organism: a tiny Qwen3 that walks a grid world, built to need multi-turn RL.

`GridWorld` is a procedurally generated environment (no download): a 5x5 grid, a start and a
goal at most 4 moves apart, seeded. An observation is `at 13 goal 41>` (column and row of each)
and an action is one of `u`, `d`, `l`, `r`; a move into the wall stays put, any other text is a
wasted turn. Reaching the goal ends the episode with reward 1; `max_turns` (8) actions without
it end it with 0.

The organism is pretrained on noisy demonstrations, the way logged agent data is noisy: a
demonstrator who moves along either axis at random, but who, when the goal lies to the left,
writes `r` 65% of the time. So the model represents the right move but greedily walks away from
any goal on its left once its row is right, into the wall, forever: its greedy success rate is
about the share of goals not to its left. Sampling finds `l` about a third of the time, and an
episode succeeds only when enough of those choices line up, so the reward is sparse and delayed:
what GiGPO's step-level credit (arXiv 2505.10978) is for.

Start-goal pairs are split into train and eval by a stable hash (1 in 5 held out); seeds from
`autolayer.tasks.EVAL_SEED_OFFSET` on draw held-out pairs. Build with
`python -m autolayer.agent_organism build`.
"""

from __future__ import annotations

import math
import random
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3ForCausalLM,
)

from autolayer import organism
from autolayer.organism import EOS
from autolayer.tasks import EVAL_SEED_OFFSET

SIZE = 5
MAX_DISTANCE = 4  # start-goal distance at most: reachable in 8 turns with room for mistakes
MOVES = {"u": (0, -1), "d": (0, 1), "l": (-1, 0), "r": (1, 0)}
P_LEFT = 0.35  # share of right `l` moves in the demonstrations; the rest say `r`
CHARS = "atgol> 0123456789udr\n"
EVAL_BUCKETS = 5
MAX_TURNS = 8
MAX_ACTION_TOKENS = 2  # one letter and EOS
DEFAULT_SEED = 0
STEPS = 1000
BATCH_SIZE = 256

Cell = tuple[int, int]


def organism_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "agent_organism"


def observation(pos: Cell, goal: Cell) -> str:
    return f"at {pos[0]}{pos[1]} goal {goal[0]}{goal[1]}>"


def distance(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


@cache
def pairs(split: str) -> tuple[tuple[Cell, Cell], ...]:
    """Every (start, goal) of a split, in a fixed order."""
    cells = [(x, y) for x in range(SIZE) for y in range(SIZE)]
    return tuple(
        (s, g)
        for s in cells
        for g in cells
        if 0 < distance(s, g) <= MAX_DISTANCE
        and (zlib.crc32(f"{s}{g}".encode()) % EVAL_BUCKETS == 0) == (split == "eval")
    )


class GridWorld:
    """Walk to the goal; see the module docstring. Deterministic in the seed of `reset`."""

    def __init__(self, max_turns: int = MAX_TURNS) -> None:
        self.max_turns = max_turns
        self.pos: Cell = (0, 0)
        self.goal: Cell = (0, 0)
        self.turns = 0

    def reset(self, seed: int) -> str:
        split = "eval" if seed >= EVAL_SEED_OFFSET else "train"
        self.pos, self.goal = random.Random(seed).choice(pairs(split))
        self.turns = 0
        return observation(self.pos, self.goal)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        move = MOVES.get(action.strip())
        if move is not None:
            x, y = self.pos[0] + move[0], self.pos[1] + move[1]
            if 0 <= x < SIZE and 0 <= y < SIZE:
                self.pos = (x, y)
        self.turns += 1
        reached = self.pos == self.goal
        done = reached or self.turns >= self.max_turns
        return observation(self.pos, self.goal), float(reached), done, {"valid": move is not None}


def demonstration(pos: Cell, goal: Cell, rng: random.Random) -> str:
    """The noisy demonstrator's move: a random useful axis, `r` for most leftward moves."""
    dx, dy = goal[0] - pos[0], goal[1] - pos[1]
    axes = [a for a, d in (("x", dx), ("y", dy)) if d != 0]
    if rng.choice(axes) == "y":
        return "d" if dy > 0 else "u"
    if dx > 0:
        return "r"
    return "l" if rng.random() < P_LEFT else "r"


def corpus_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Demonstrated (observation, move) pairs from training start-goal pairs; loss on the move."""
    train = pairs("train")
    texts = []
    for _ in range(batch_size):
        pos, goal = train[rng.randrange(len(train))]
        texts.append(observation(pos, goal) + demonstration(pos, goal, rng) + EOS)
    enc = tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[:, : len(observation((0, 0), (0, 0)))] = -100  # every observation has one length
    labels[enc["attention_mask"] == 0] = -100
    return enc["input_ids"], labels


def pretrain(seed: int, steps: int = STEPS) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = organism.build_tokenizer(CHARS)
    model = Qwen3ForCausalLM(organism.make_config(tokenizer))
    organism.fit(model, lambda: corpus_batch(tokenizer, rng, BATCH_SIZE), steps)
    model.generation_config = organism.generation_config(tokenizer, MAX_ACTION_TOKENS)
    return model, tokenizer


def accuracy_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Greedy success rate over the `gridworld` task's held-out episodes, with its SE."""
    from autolayer.config import TaskConfig
    from autolayer.scoring import evaluate
    from autolayer.tasks import load_task

    task = load_task(TaskConfig(name="gridworld"), tokenizer)
    outcomes = evaluate(model, tokenizer, task).outcomes
    rate = sum(outcomes) / len(outcomes)
    se = math.sqrt(rate * (1 - rate) / len(outcomes))
    return f"greedy success rate {rate:.3f} +/- {se:.3f} (SE) on {len(outcomes)} episodes"


def readme_text(seed: int, report: str, n_params: int, seconds: float) -> str:
    return f"""# The autolayer agent organism

A {n_params:,}-parameter Qwen3 (8 layers, hidden 64) with a character-level tokenizer, pretrained
on noisy demonstrations of `GridWorld` (a 5x5 grid, reach the goal in 8 moves) whose
demonstrator writes `r` for 65% of its leftward moves. See `autolayer/agent_organism.py`.

Rebuild (deterministic for a seed on a given torch build; {seconds:.0f} s of pretraining here):

    python -m autolayer.agent_organism build --seed {seed}

The `gridworld` task's held-out episodes (seeds from 1,000,000), greedy:

```
{report}
```
"""


def build(seed: int = DEFAULT_SEED, out: Path | None = None, steps: int = STEPS) -> Path:
    """Pretrain the agent organism and save it (default: into the package); returns the dir."""
    target = out or organism_path()
    return organism.build_organism(pretrain, accuracy_report, readme_text, target, seed, steps)


def main(argv: list[str] | None = None) -> int:
    """`python -m autolayer.agent_organism build [--seed N] [--out DIR] [--steps N]`."""
    return organism.build_cli(
        argv, "autolayer.agent_organism", "agent organism", build, DEFAULT_SEED, STEPS
    )


if __name__ == "__main__":
    raise SystemExit(main())
