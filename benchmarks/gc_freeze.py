"""What freezing the loaded heap saves a search: `autolayer demo` with and without it.

    python benchmarks/gc_freeze.py [--rounds 2]

Optuna and the racing loop collect garbage after every trial; `autolayer.runner.frozen_heap`
keeps what the search loaded (libraries, model, data) out of those collections. Each round runs
the demo twice in fresh processes, freeze off then on, each on an empty store, and reports the
wall time of the whole command and how long one full collection takes in a loaded search.
Output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

ONE_DEMO = """
import contextlib, sys, time
from autolayer import runner
from autolayer.cli import main
if sys.argv[1] == "off":
    runner.frozen_heap = contextlib.nullcontext
start = time.perf_counter()
code = main(["demo", "--root", sys.argv[2]])
print(time.perf_counter() - start, file=sys.stderr)
sys.exit(code)
"""

ONE_COLLECTION = """
import gc, json, time
import autolayer.runner
from autolayer.config import Config
from autolayer.loading import load_for
work = load_for(Config())
times = {"objects": len(gc.get_objects())}
for state in ("loaded", "frozen"):
    if state == "frozen":
        gc.freeze()
    start = time.perf_counter()
    gc.collect()
    times[state] = time.perf_counter() - start
print(json.dumps(times))
"""


def demo_seconds(freeze: str) -> float:
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run(
            [sys.executable, "-c", ONE_DEMO, freeze, root],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return float(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for freeze in ("off", "on"):
            seconds[freeze].append(round(demo_seconds(freeze), 1))
    collection = subprocess.run(
        [sys.executable, "-c", ONE_COLLECTION], capture_output=True, text=True, check=True
    )
    print(
        json.dumps(
            {
                "demo_seconds": seconds,
                "median_off": statistics.median(seconds["off"]),
                "median_on": statistics.median(seconds["on"]),
                "one_collection": json.loads(collection.stdout.strip().splitlines()[-1]),
            }
        )
    )


if __name__ == "__main__":
    main()
