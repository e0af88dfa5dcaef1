"""Time the proxy's policy pass (forward and backward from log-probs) with and without
`logits_to_keep`, interleaved on the same batch.

    python benchmarks/logprob_pass.py --model models/smollm2-135m-instruct --layer 15
    python benchmarks/logprob_pass.py --model organism --layer 4

The batch is `--rows` sequences of `--prompt` prompt tokens and `--completion` completion tokens
(random ids: the pass costs the same whatever the text). With `logits_to_keep` the LM head runs
only over the positions that predict completion tokens; without it, over every position, then the
prompt positions are sliced off. Prints the median seconds of each and their ratio, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from autolayer.config import ProxyConfig
from autolayer.loading import Workload
from autolayer.models import load_model, set_threads
from autolayer.proxy import GRPOModule
from autolayer.tasks import Task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="organism")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    set_threads(None)
    task = Task("none", None, None, ())  # type: ignore[arg-type]  # the pass needs no data
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    module = GRPOModule(
        Workload(model, tokenizer, task), ProxyConfig(device="cpu"), [args.layer], 1e-4
    )
    vocab = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (args.rows, args.prompt + args.completion))
    mask = torch.ones_like(ids)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for keep in (True, False):
            module.keeps_logits = keep
            model.zero_grad()
            start = time.perf_counter()
            module._logprobs(ids, mask, args.prompt).sum().backward()
            times[keep].append(time.perf_counter() - start)
    kept, full = (statistics.median(times[k][1:]) for k in (True, False))
    print(json.dumps({
        "model": args.model, "layer": args.layer, "rows": args.rows, "prompt": args.prompt,
        "completion": args.completion, "vocab": vocab, "threads": torch.get_num_threads(),
        "logits_to_keep_s": round(kept, 4), "all_logits_s": round(full, 4),
        "ratio": round(kept / full, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
