"""What a proxy run of one layer changes, over seeds, in fp32 and with bf16 master weights.

    python benchmarks/sparsity.py [--config examples/organism.yaml] [--layer 4] [--seeds 0,1,2]

Trains `--layer` from the same base once per proxy seed, with fp32 and with bf16 master weights
(`proxy.master_weights`), and prints the layer's update sparsity (absolute and bf16-relative
probes), relative update norm, NSS and the share of the fp32 update that bf16 storage would drop,
each as mean and standard deviation over seeds, then the run-to-run overlap (o1, o2, Jaccard) of
the update masks of every pair of seeds against chance.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import replace

import torch

from autolayer.analysis import (
    bf16_dropped,
    normalized_spectral_shift,
    relative_update_norm,
    run_overlap,
    sparsity,
    update_mask_abs,
    update_mask_rel,
)
from autolayer.config import load_config
from autolayer.loading import load_for, prepare_task
from autolayer.models import layer_param_names, restore, snapshot
from autolayer.proxy import run_proxy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/organism.yaml")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    config = load_config(args.config)
    work = load_for(config, prepare_task(config))
    model, tokenizer, task = work
    names = [n for n in layer_param_names(model, [args.layer]) if n.endswith(".weight")]
    params = dict(model.named_parameters())
    base = snapshot(model, layer_param_names(model, [args.layer]))
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"layer {args.layer}, {config.proxy.steps} steps at lr {config.proxy.lr:g}, seeds {seeds}"
    )
    print("| master weights | sparsity abs | sparsity bf16 | rel. norm | NSS | bf16 would drop |")
    print("|---|---|---|---|---|---|")
    for precision in ("float32", "bfloat16"):
        rows, masks = [], []
        for seed in seeds:
            proxy = replace(config.proxy, seed=seed, master_weights=precision)
            run_proxy(work, proxy, [args.layer])
            after = {n: params[n].detach().clone() for n in names}
            restore(model, {n: t.clone() for n, t in base.items()})  # restore takes ownership
            w0 = torch.cat([base[n].flatten() for n in names])
            w1 = torch.cat([after[n].flatten() for n in names])
            matrices = [n for n in names if base[n].dim() == 2]
            rows.append(
                (
                    sparsity(update_mask_abs(w0, w1)),
                    sparsity(update_mask_rel(w0, w1)),
                    relative_update_norm(w0, w1),
                    statistics.mean(normalized_spectral_shift(base[n], after[n]) for n in matrices),
                    bf16_dropped(w0, w1),
                )
            )
            masks.append(update_mask_abs(w0, w1))
        cells = [
            f"{statistics.mean(c):.4f} ± {statistics.stdev(c) if len(c) > 1 else 0:.4f}"
            for c in zip(*rows, strict=True)
        ]
        print(f"| {precision} | " + " | ".join(cells) + " |")
        for (i, a), (j, b) in itertools.combinations(enumerate(masks), 2):
            r = run_overlap(a, b)
            print(
                f"  {precision} seeds {seeds[i]} vs {seeds[j]}: o1 {r['o1']:.3f} "
                f"(chance {r['o1_chance']:.3f}), Jaccard {r['jaccard']:.3f} "
                f"(chance {r['jaccard_chance']:.3f})"
            )


if __name__ == "__main__":
    main()
