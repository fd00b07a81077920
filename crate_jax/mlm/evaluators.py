"""Masked-LM evaluator: `config.evals.NAME = dict(type='mlm_loss', split='val', max_rows=..., every=...)`.

`mlm_loss`: the mean cross-entropy (nats) over the masked positions of the held-out rows, the accuracy of
the arg-max prediction there, and their number. Rows and masks are the same at every evaluation
(`crate_jax.mlm.data.eval_batches`: ordered rows, masks fixed by the row index), so values at different
steps compare the same tokens; each process scores its own block of rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from crate_jax.mlm.task import MLMTask, masked_nll
from crate_jax.errors import ConfigError
from crate_jax.train.evaluation import jit_on_model, schedule_of, summed_over


def mlm_sums(model, batch) -> dict:
    """Summed NLL, correct predictions and masked positions over the real (mask=True) rows of one batch."""
    nll, correct, chosen = masked_nll(model(batch["tokens"]), batch["labels"])
    rows = batch["mask"].astype(jnp.float32)[:, None]
    return {"nll": jnp.sum(nll * rows), "correct": jnp.sum(correct * rows), "tokens": jnp.sum(chosen * rows)}


class MLMLossEvaluator:
    """`type='mlm_loss'`: `loss` (nats / masked token), `accuracy`, `tokens` on `split` (default 'val')."""

    def __init__(self, name: str, spec: ConfigDict, task, mesh):
        key = f"config.evals.{name}"
        if not isinstance(task, MLMTask):
            raise ConfigError(f"{key}: type 'mlm_loss' evaluates a masked language model; this run's task is "
                              f"{type(task).__name__}")
        self.name, self.task, self.mesh = name, task, mesh
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        self.split = spec.get("split", "val")
        mr = spec.get("max_rows", None)
        if mr is not None and (not isinstance(mr, int) or isinstance(mr, bool) or mr < 1):
            raise ConfigError(f"{key}.max_rows: expected an integer >= 1 (or None: every row), got {mr!r}")
        self.max_rows = mr
        self.seed = int(spec.get("seed", 0))
        if task.data_dir:  # the split exists and holds at least one row: a start-up error otherwise
            from crate_jax.data.tokens.loader import TokenDataError
            from crate_jax.mlm.data import eval_rows
            try:
                n = eval_rows(task.dataset, self.split, seq_len=int(task.config.seq_len))
            except TokenDataError as e:
                raise ConfigError(f"{key}: {e}") from None
            if n == 0:
                raise ConfigError(f"{key}: split {self.split!r} of {task.data_dir} holds fewer than seq_len - 2 = "
                                  f"{int(task.config.seq_len) - 2} tokens")
        self._fn = None

    def run(self, state) -> dict[str, float]:
        from crate_jax.mlm.data import eval_batches
        if self._fn is None:
            self._fn = jit_on_model(state.graphdef, mlm_sums)
        it = eval_batches(self.task.dataset, self.task.vocab, self.split, seq_len=int(self.task.config.seq_len),
                          batch_size=self.batch_size // jax.process_count(), masking=self.task.masking,
                          max_rows=self.max_rows, seed=self.seed, process_index=jax.process_index(),
                          process_count=jax.process_count())
        total = summed_over(self._fn, state, it, self.mesh)
        n = max(float(total["tokens"]), 1.0)
        return {"loss": float(total["nll"]) / n, "accuracy": float(total["correct"]) / n,
                "tokens": float(total["tokens"])}
