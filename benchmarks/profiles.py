"""Single-layer profiles of the bundled organisms across algorithms and tasks, and how they agree.

    python benchmarks/profiles.py [--root /tmp/profiles] [--seed 0]

For each test bed below, an exhaustive single-layer search (no pruning, tracking off) measures
every layer; profiles on the same model are then compared with `autolayer.compare` (Spearman and
Kendall, exact p, prompt-bootstrap intervals), the miniature of arXiv 2607.01232's cross-task
table. For each study it also measures the pre-search signal (`autolayer.presignal`, 5 steps of
all layers) and reports its Spearman against the study's profile. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
from scipy import stats

from autolayer.compare import agreement, noisiness, profile
from autolayer.config import Config, load_config
from autolayer.loading import load_for, prepare_task
from autolayer.presignal import layer_signal
from autolayer.runner import run_search

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BEDS = [  # (study, config, algorithm): one model per group of rows
    ("organism-grpo", "organism.yaml", "grpo"),
    ("organism-dr_grpo", "organism.yaml", "dr_grpo"),
    ("organism-subtraction-grpo", "byo_task/task.yaml", "grpo"),
    ("code-grpo", "code_organism.yaml", "grpo"),
    ("code-dr_grpo", "code_organism.yaml", "dr_grpo"),
    ("agent-gigpo", "agent.yaml", "gigpo"),
    ("agent-grpo", "agent.yaml", "grpo"),
    ("agent-corridor-gigpo", "agent_env/task.yaml", "gigpo"),
]
SIGNAL_STEPS = 5


def configure(name: str, path: str, algorithm: str, root: Path, seed: int) -> Config:
    config = load_config(EXAMPLES / path)
    config.proxy.algorithm = algorithm  # type: ignore[assignment]
    config.proxy.seed = seed
    config.search.study_name = name
    config.search.space = "single_layer"
    config.search.pruner = "none"  # every layer measured to the end
    config.search.n_trials = None
    config.tracking.enabled = False
    return config


def signal_rho(config: Config, scores: np.ndarray, layers: tuple[int, ...]) -> tuple[float, float]:
    """Spearman of the pre-search signal (update norm, gradient norm) against the profile."""
    work = load_for(config, prepare_task(config))
    signals = layer_signal(work, config.proxy, SIGNAL_STEPS, config.proxy.full_lr)
    by_layer = {s.layer: s for s in signals}
    update = [by_layer[x].update_norm for x in layers]
    grad = [by_layer[x].grad_norm for x in layers]
    return (
        float(stats.spearmanr(update, scores).statistic),
        float(stats.spearmanr(grad, scores).statistic),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/autolayer-profiles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.root)
    profiles = {}
    print(
        "| study | model | base -> best layer (score) | profile stability "
        "| signal rho (update, grad) | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for name, path, algorithm in BEDS:
        config = configure(name, path, algorithm, root, args.seed)
        start = time.perf_counter()
        study = run_search(config, root=root).study
        p = profile(study)
        rho_update, rho_grad = signal_rho(config, p.scores, p.layers)
        profiles[name] = p
        best = int(np.argmax(p.scores))
        base = study.user_attrs.get("reference_base_score", float("nan"))
        print(
            f"| {name} | {p.model} | {base:.3f} -> L{p.layers[best]} ({p.scores[best]:.3f}) | "
            f"{noisiness(p):.2f} | {rho_update:+.2f}, {rho_grad:+.2f} | "
            f"{time.perf_counter() - start:.0f} |",
            flush=True,
        )
    print("\n| first | second | Spearman rho [95% CI] | exact p | Kendall tau [95% CI] | note |")
    print("|---|---|---|---|---|---|")
    for a, b in itertools.combinations(profiles.values(), 2):
        if a.model != b.model:
            continue
        r = agreement(a, b, seed=args.seed)
        print(
            f"| {r.first} | {r.second} | {r.spearman:+.2f} [{r.spearman_ci[0]:+.2f}, "
            f"{r.spearman_ci[1]:+.2f}] | {r.spearman_p:.3g} | {r.kendall:+.2f} "
            f"[{r.kendall_ci[0]:+.2f}, {r.kendall_ci[1]:+.2f}] | {r.note} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
