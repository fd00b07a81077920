"""Language-model evaluators: `config.evals.NAME = dict(type='lm_loss', split='val', max_windows=..., every=...)`.

`lm_loss`: the mean next-token cross-entropy (nats per token) on held-out tokens and its
perplexity `exp(loss)`, over ordered windows of `block + 1` tokens with stride `block`
(`crate_jax.data.tokens.loader.eval_batches`: every held-out token after the first is scored once, each
process scoring its own block of windows), up to `max_windows` windows (default all).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from crate_jax.lm.task import LMTask, next_token_nll
from crate_jax.errors import ConfigError
from crate_jax.train.evaluation import jit_on_model, schedule_of, summed_over


def nll_sums(model, batch) -> dict:
    """Sum of per-token NLL and the number of scored tokens over the real (mask=True) rows of one batch."""
    tokens = batch["tokens"]
    nll = next_token_nll(model(tokens[:, :-1]), tokens[:, 1:])
    mask = batch["mask"].astype(jnp.float32)[:, None]
    return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(jnp.broadcast_to(mask, nll.shape))}


class LMLossEvaluator:
    """`type='lm_loss'`: `loss` (nats / token), `perplexity`, `tokens` on `split` (default 'val')."""

    def __init__(self, name: str, spec: ConfigDict, task, mesh):
        key = f"config.evals.{name}"
        if not isinstance(task, LMTask):
            raise ConfigError(f"{key}: type 'lm_loss' evaluates a language model; this run's task is "
                              f"{type(task).__name__}")
        self.name, self.task, self.mesh = name, task, mesh
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        self.split = spec.get("split", "val")
        mw = spec.get("max_windows", None)
        if mw is not None and (not isinstance(mw, int) or isinstance(mw, bool) or mw < 1):
            raise ConfigError(f"{key}.max_windows: expected an integer >= 1 (or None: every window), got {mw!r}")
        self.max_windows = mw
        if task.data_dir:  # the split exists and holds at least one window: a start-up error otherwise
            from crate_jax.data.tokens.loader import TokenDataError, eval_windows
            try:
                n = eval_windows(task.dataset, self.split, block=task.model_cfg.block_size)
            except TokenDataError as e:
                raise ConfigError(f"{key}: {e}") from None
            if n == 0:
                raise ConfigError(f"{key}: split {self.split!r} of {task.data_dir} has fewer than block + 1 = "
                                  f"{task.model_cfg.block_size + 1} tokens")
        self._fn = None

    def run(self, state) -> dict[str, float]:
        from crate_jax.data.tokens.loader import eval_batches
        if self._fn is None:
            self._fn = jit_on_model(state.graphdef, nll_sums)
        it = eval_batches(self.task.dataset, self.split, block=self.task.model_cfg.block_size,
                          batch_size=self.batch_size // jax.process_count(), max_windows=self.max_windows,
                          process_index=jax.process_index(), process_count=jax.process_count())
        total = summed_over(self._fn, state, it, self.mesh)
        n = max(float(total["tokens"]), 1.0)
        loss = float(total["nll"]) / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(total["tokens"])}
