"""Run HumanEval's 164 canonical solutions through the sandbox: every one must pass.

    python benchmarks/sandbox_humaneval.py

Prints how many passed, the wall time on this machine's cores, and which isolation layers
(network and PID namespaces, a dropped user) the OS allowed here.
"""

from __future__ import annotations

import gzip
import json
import time

from autolayer import sandbox
from autolayer.coding import humaneval_path, passes_tests


def main() -> None:
    with gzip.open(humaneval_path(), "rt") as handle:
        rows = [json.loads(line) for line in handle]
    start = time.perf_counter()
    rewards = passes_tests(
        [r["prompt"] for r in rows],
        [r["canonical_solution"] for r in rows],
        [r["test"] for r in rows],
        [r["entry_point"] for r in rows],
    )
    seconds = time.perf_counter() - start
    print(
        f"{int(sum(rewards))}/{len(rows)} canonical solutions pass in {seconds:.1f} s "
        f"on {sandbox.workers()} cores; isolation: {sandbox.isolation()}"
    )


if __name__ == "__main__":
    main()
