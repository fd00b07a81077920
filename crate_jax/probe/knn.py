"""Weighted k-NN classification on frozen features, as DINO evaluates (`eval_knn.py::knn_classifier`).

Features are L2-normalised; each test feature's `k` (20) most cosine-similar train features vote for their
label with weight `exp(sim / T)` (T = 0.07); the class with the largest total wins (top-5: the five
largest). Test features go through in global batches sharded over (data, fsdp), the train bank and its
labels replicated on every device (XLA computes each shard's similarities locally).

Evaluator `type='knn'` (any task, any backbone; spec keys of `crate_jax.probe.features.ProbeData` plus
`k`, `temperature`): metrics `top1`, `top5`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from crate_jax.errors import ConfigError
from crate_jax.models.heads import l2_normalize
from crate_jax.models.batch_apply import apply_in_batches
from crate_jax.probe.features import ProbeData

K, TEMPERATURE = 20, 0.07


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_votes(bank, bank_labels, queries, *, k: int, temperature: float, num_classes: int) -> jax.Array:
    """`[B, num_classes]` summed `exp(sim / T)` votes of each query's `k` nearest bank rows (cosine)."""
    sim = jnp.einsum("bd,nd->bn", l2_normalize(queries), l2_normalize(bank), precision=jax.lax.Precision.HIGHEST)
    top, idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top / temperature)
    onehot = jax.nn.one_hot(bank_labels[idx], num_classes, dtype=jnp.float32)  # [B, k, C]
    return jnp.einsum("bk,bkc->bc", weights, onehot)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, mesh, k: int = K,
                 temperature: float = TEMPERATURE, num_classes: int | None = None,
                 batch: int = 256) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the weighted k-NN classifier (host arrays in, floats out)."""
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    n = len(train_labels)
    if n == 0 or len(test_labels) == 0:
        raise ValueError("k-NN needs a non-empty train bank and test set")
    k = min(int(k), n)
    C = int(num_classes or (max(train_labels.max(), test_labels.max()) + 1))
    rep = NamedSharding(mesh, P())
    bank = jax.device_put(np.asarray(train_feats, np.float32), rep)
    bank_labels = jax.device_put(train_labels, rep)
    votes = apply_in_batches(lambda q: knn_votes(bank, bank_labels, q, k=k, temperature=float(temperature),
                                                 num_classes=C), [np.asarray(test_feats, np.float32)], batch, mesh=mesh)
    order = np.argsort(-votes, axis=1, kind="stable")
    top1 = int(np.sum(order[:, 0] == test_labels))
    top5 = int(np.sum(np.any(order[:, :min(5, C)] == test_labels[:, None], axis=1)))
    m = len(test_labels)
    return {"top1": top1 / m, "top5": top5 / m}


class KNNEvaluator:
    """`type='knn'`: weighted k-NN top-1 / top-5 on the frozen features of `eval_split`, bank from `train_split`."""

    def __init__(self, name: str, spec, task, mesh):
        self.probe = ProbeData(name, spec, task, mesh, extra_keys=("k", "temperature"))
        self.name, self.every, self.mesh = name, self.probe.every, mesh
        self.k = spec.get("k", K)
        self.temperature = spec.get("temperature", TEMPERATURE)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigError(f"config.evals.{name}.k: expected an integer >= 1, got {self.k!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ConfigError(f"config.evals.{name}.temperature: expected a positive number, got {self.temperature!r}")

    def run(self, state) -> dict[str, float]:
        xtr, ytr = self.probe.extract(state, self.probe.train_split)
        xte, yte = self.probe.extract(state, self.probe.eval_split)
        return knn_accuracy(xtr, ytr, xte, yte, mesh=self.mesh, k=self.k, temperature=self.temperature,
                            batch=self.probe.batch_size)
