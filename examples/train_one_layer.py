"""Train one middle layer of a bundled model with GRPO and report its layer contribution.

    python examples/train_one_layer.py [--layer 4] [--config examples/organism.yaml] [--seeds 0,1,2]

Prints the base score, the all-layers score, the single-layer score and C with its 95% CI; with
several proxy seeds (sampling and data order), one block per seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from autolayer.config import Config, load_config
from autolayer.measure import measure

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="Layer to train (default: the middle one)."
    )
    parser.add_argument("--config", default=str(HERE / "organism.yaml"), help="YAML config.")
    parser.add_argument("--seeds", default="0", help="Proxy seeds, comma-separated.")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        config = load_config(args.config)
        config.proxy.seed = seed
        print(f"--- proxy seed {seed}")
        report(config, args.layer if args.layer is not None else 4)


def report(config: Config, layer: int) -> None:
    start = time.perf_counter()
    result = measure(config, [layer])
    assert result.full is not None and result.contribution is not None
    p = config.proxy
    rows = [
        ("held-out prompts", f"{len(result.base.outcomes)}"),
        ("base score", f"{result.base.score:.3f} ± {result.base.stderr:.3f}"),
        (f"all layers (lr {p.full_lr:g})", f"{result.full.score:.3f} ± {result.full.stderr:.3f}"),
        (
            f"layer {layer} (lr {result.subset.lr:g})",
            f"{result.subset.score:.3f} ± {result.subset.final.stderr:.3f}",
        ),
        ("contribution C [95% CI]", str(result.contribution)),
        (
            "proxy run, layer only",
            f"{result.subset.seconds:.1f} s for {result.subset.steps} steps "
            f"of {p.prompts_per_step} prompts x {p.num_generations} samples (evals included)",
        ),
        ("wall time", f"{time.perf_counter() - start:.0f} s"),
    ]
    for label, value in rows:
        print(f"{label:<26}{value}")


if __name__ == "__main__":
    main()
