"""Held-out score of the all-layers proxy run for several learning rates (tunes `proxy.full_lr`).

    python benchmarks/full_lr_sweep.py [--config examples/organism.yaml] [--lrs 3e-5,1e-4,3e-4,1e-3]

The paper tunes the full-parameter lr separately from the single-layer one; C is only meaningful
against a well-tuned reference. Prints one JSON line per lr with the held-out score at each eval.
"""

from __future__ import annotations

import argparse
import json
import time

from autolayer.config import load_config
from autolayer.loading import base_reference, load_for
from autolayer.models import find_layer_stack
from autolayer.proxy import run_proxy
from autolayer.tracking import DEFAULT_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3")
    args = parser.parse_args()
    config = load_config(args.config)
    work = load_for(config)
    base = base_reference(config, work, DEFAULT_ROOT)
    print(json.dumps({"base_score": base.score, "stderr": round(base.stderr, 4)}))
    every_layer = range(len(find_layer_stack(work.model)))
    for lr in (float(x) for x in args.lrs.split(",")):
        start = time.perf_counter()
        result = run_proxy(work, config.proxy, every_layer, lr, keep=False)
        seconds = round(time.perf_counter() - start, 1)
        print(json.dumps({"full_lr": lr, "evals": result.evals, "seconds": seconds}))


if __name__ == "__main__":
    main()
