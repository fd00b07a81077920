"""Shared bits for the engine tests: a tiny digits config and metrics reading."""

import json
from pathlib import Path

from ml_collections import ConfigDict

from crate_jax.configs import digits


def tiny_config(**overrides):
    c = digits.get_config("steps=6,batch=32")
    # No drop-path: its per-row masks depend on where a row sits in the global batch, which legitimately
    # differs between a 1-process and a 2-process run (process 0's rows first).
    c.model.update(width=32, depth=2, num_heads=2, drop_path=0.0)
    c.eval_batch_size = 64
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 2
    c.data.eval_split = None
    c.evals = ConfigDict()
    c.async_checkpoints = False
    for k, v in overrides.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out
