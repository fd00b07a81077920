"""Training: the sharded engine (loop, step, optimizer, checkpoints, metrics). The task families live in
their own rooms (`crate_jax.classify`, `clip`, `lm`, `mlm`, `ssl`), named in `registry`."""
