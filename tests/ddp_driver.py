"""One proxy step of the organism on `devices` CPU processes, on a fixed batch; rank 0 saves the
trained layers' gradient. Run by tests/test_proxy.py (Lightning's DDP launcher re-runs this file
for rank 1):

    python tests/ddp_driver.py OUT_DIR DEVICES
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from autolayer.config import ProxyConfig
from autolayer.layers import ORGANISM
from autolayer.loading import Workload
from autolayer.models import load_model, trainable_parameters
from autolayer.proxy import GRPOModule, Rollout, run_proxy
from autolayer.tasks import TaskConfig, load_task

G = 4


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    config = ProxyConfig(
        steps=1, prompts_per_step=4, num_generations=G, eval_every=1, beta=0.1, lr=1e-3,
        device="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", seed=0,
        temperature=3.0,  # distinct completions in every group: a gradient that is not ~0
    )  # fmt: skip
    model, tokenizer = load_model(ORGANISM, dtype="float32", device="cpu")
    task = load_task(TaskConfig(name="organism", train_size=64, eval_size=8), tokenizer)
    rollout = out / "rollout.pt"
    sample = GRPOModule._rollout

    def fixed(self: GRPOModule, batch: dict[str, list[Any]]) -> Rollout:
        """The one-device run samples and keeps the step's batch; every rank of the N-device run
        takes its prompts' G rows of it, padded as in the full batch."""
        if not rollout.exists():
            roll = dataclasses.replace(
                sample(self, batch),
                rewards=(torch.arange(4 * G) % 3 == 0).float(),  # every group has a spread
                generated=None,
            )
            torch.save({"roll": roll.__dict__, "prompts": list(batch["prompt"])}, rollout)
        saved = torch.load(rollout, weights_only=False)
        prompts = saved["prompts"]
        assert len(set(prompts)) == len(prompts)
        groups = [prompts.index(p) for p in batch["prompt"]]
        rows = [g * G + j for g in groups for j in range(G)]
        seen.append(len(rows))
        roll = Rollout(**saved["roll"])
        return dataclasses.replace(
            roll,
            prompt_ids=roll.prompt_ids[groups],
            prompt_mask=roll.prompt_mask[groups],
            completion_ids=roll.completion_ids[rows],
            mask=roll.mask[rows],
            rewards=roll.rewards[rows],
        )

    clip = GRPOModule._clip_gradients
    seen: list[int] = []  # completions this process trained on

    def keep_gradient(self: GRPOModule) -> torch.Tensor:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            grads = [p.grad.detach().clone() for p in trainable_parameters(self.model)]
            world = self.trainer.world_size
            torch.save({"grads": grads, "world": world, "rows": seen}, out / f"grad-{devices}.pt")
        return clip(self)

    GRPOModule._rollout = fixed  # type: ignore[method-assign]
    GRPOModule._clip_gradients = keep_gradient  # type: ignore[method-assign]
    run_proxy(Workload(model, tokenizer, task), config, [4])


if __name__ == "__main__":
    main()
