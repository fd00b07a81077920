"""The classification evaluator (`type='classification'`): top-1 / top-5 / loss of the image classifier on a
held-out split. Config keys read per evaluator: `split` (default `config.data.eval_split`) and `batch_size`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from crate_jax.classify.task import ClassificationTask
from crate_jax.errors import ConfigError
from crate_jax.models.preprocess import normalize
from crate_jax.parallel.sharding import global_batch
from crate_jax.train.evaluation import jit_on_model, schedule_of


def eval_sums(model, batch) -> dict:
    """Sums over the real (mask=True) examples of one eval batch: top-1 / top-5 correct, loss, count."""
    logits = model(normalize(batch["image"])).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], -1)[:, 0]
    return {"top1": jnp.sum((top5[:, 0] == label) * mask),
            "top5": jnp.sum(jnp.any(top5 == label[:, None], -1) * mask),
            "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}


class ClassificationEvaluator:
    """`type='classification'`: top-1, top-5 and loss of the image classifier on `split` (default
    `config.data.eval_split`), one padded pass, every process reading its own block."""

    def __init__(self, name: str, spec: ConfigDict, task, mesh):
        key = f"config.evals.{name}"
        if not isinstance(task, ClassificationTask):
            raise ConfigError(f"{key}: type 'classification' evaluates an image classifier; this run's task is "
                              f"{type(task).__name__}")
        self.name, self.task, self.mesh = name, task, mesh
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        if "split" in spec and not spec.split:
            raise ConfigError(f"{key}.split is empty: name the split to evaluate (e.g. 'validation'), or drop the "
                              f"key to use config.data.eval_split")
        self.split = spec.get("split", None) or task.config.data.get("eval_split")
        if not self.split:
            raise ConfigError(f"{key}.split: no eval split (set it, or config.data.eval_split)")
        self._fn = None

    def run(self, state) -> dict[str, float]:
        if self._fn is None:  # compiled once, reused at every evaluation
            self._fn = jit_on_model(state.graphdef, eval_sums)
        it = self.task.loader.make_eval_iterator(
            self.task.config.data, split=self.split, batch_size=self.batch_size // jax.process_count(),
            image_size=self.task.model_cfg.image_size, process_index=jax.process_index(),
            process_count=jax.process_count())
        sums = None
        for batch in it:
            b = self._fn(state.params, state.buffers, global_batch(batch, self.mesh))
            sums = b if sums is None else jax.tree.map(jnp.add, sums, b)
        if sums is None:
            raise RuntimeError(f"evaluator {self.name!r}: split {self.split!r} gave no batches")
        sums = jax.device_get(sums)
        n = max(float(sums["count"]), 1.0)
        return {"top1": float(sums["top1"]) / n, "top5": float(sums["top5"]) / n, "loss": float(sums["loss"]) / n}
