"""Frozen features of a labelled split, for the k-NN and linear-probe evaluators, from any backbone.

`features_of(model, images)` is the representation a probe reads: a model's own `features(images)` if it
has one (CRATE-MAE: the unmasked encoder's cls token; SimDINO: the backbone's pooled token, before the
projection head), else for an `ImageClassifier` its pooled, normalised token before the classification
head (`crate_jax.models.self_distill.backbone_features`).

`ProbeData` reads the evaluator's spec (shared by `knn` and `linear_probe`):

    data:        classification data config (default: the task's `config.data`)  e.g. dict(source='mnist')
    train_split: the split the probe is fitted on (default `data.train_split`)
    eval_split:  the split it is scored on (default `data.eval_split`)
    image_size:  default the model's resolution (a SimDINO model: its global-crop size)
    params:      'student' (the trained parameters, default) or 'teacher' (`extras['teacher']`)
    batch_size:  global eval batch (default `config.eval_batch_size`); `every` as for every evaluator

Both splits are read once per evaluation in the deterministic eval order (eval preprocessing: resize-small
and centre crop, or a plain resize with `augment='none'`), every process reading its own block of each
global batch; the jitted feature function returns features replicated on every device, so each process
holds the full `[N, d]` matrix afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from crate_jax.models.batch_apply import replicator
from crate_jax.models.classifier import ImageClassifier
from crate_jax.errors import ConfigError
from crate_jax.models.preprocess import normalize
from crate_jax.models.self_distill import backbone_features
from crate_jax.parallel.sharding import global_batch
from crate_jax.train.evaluation import schedule_of

PARAMS = ("student", "teacher")
SPEC_KEYS = ("type", "every", "batch_size", "data", "train_split", "eval_split", "image_size", "params")


def features_of(model, images: jax.Array) -> jax.Array:
    """`[B, d]` float32 features of normalised NHWC images."""
    if hasattr(model, "features"):
        return model.features(images).astype(jnp.float32)
    if isinstance(model, ImageClassifier):
        return backbone_features(model, images).astype(jnp.float32)
    raise TypeError(f"no probe features for a {type(model).__name__}: give it a features(images) method")


class ProbeData:
    """The parsed spec of a probe evaluator: data, splits, resolution, which parameters, batch."""

    def __init__(self, name: str, spec: ConfigDict, task, mesh, extra_keys=()):
        from crate_jax.data.images import loader

        key = f"config.evals.{name}"
        unknown = sorted(set(spec.keys()) - set(SPEC_KEYS) - set(extra_keys))
        if unknown:
            raise ConfigError(f"{key}: unknown keys {unknown}; known keys are {sorted(set(SPEC_KEYS) | set(extra_keys))}")
        self.name, self.task, self.mesh, self.loader = name, task, mesh, loader
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        data = spec.get("data", None)
        base = dict(task.config.get("data", None) or {})
        if data is not None:
            base.update(dict(data))
        try:
            self.data = loader.resolve_config(ConfigDict(base))
        except ValueError as e:
            raise ConfigError(f"{key}.data: {e}") from None
        self.train_split = spec.get("train_split", None) or self.data.train_split
        self.eval_split = spec.get("eval_split", None) or self.data.eval_split
        if not self.train_split or not self.eval_split:
            raise ConfigError(f"{key}: a probe needs a train_split and an eval_split (set them, or data.train_split / "
                              f"data.eval_split)")
        size = spec.get("image_size", None) or getattr(task.model_cfg, "image_size", None)
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"{key}.image_size: expected the probe resolution in pixels, got {size!r}")
        self.image_size = size
        self.params = spec.get("params", "student")
        if self.params not in PARAMS:
            raise ConfigError(f"{key}.params: got {self.params!r}, expected one of {PARAMS}")

    def state_params(self, state):
        if self.params == "student":
            return state.params
        if not isinstance(state.extras, dict) or "teacher" not in state.extras:
            raise RuntimeError(f"evaluator {self.name!r}: params='teacher' but this task keeps no teacher extra")
        return state.extras["teacher"]

    def extract(self, state, split: str) -> tuple[np.ndarray, np.ndarray]:
        """`(features [N, d] float32, labels [N] int32)` of `split` (padding dropped), on every process. Probes
        that run on the same state, parameters, data and split share one extraction (and one compile)."""
        params = self.state_params(state)
        key = (state.graphdef, state.step, id(params), repr(sorted(self.data.to_dict().items())), split,
               self.image_size, self.batch_size)
        hit = _RECENT.get(key)
        if hit is not None and hit[0] is params:
            return hit[1]
        out = extract_features(_feature_fn(state.graphdef, self.mesh), params, state.buffers, self.loader, self.data,
                               split, batch_size=self.batch_size, image_size=self.image_size, mesh=self.mesh)
        if len(_RECENT) >= 4:
            _RECENT.clear()
        _RECENT[key] = (params, out)  # holding `params` keeps its id from being reused while cached
        return out


_RECENT: dict = {}


@functools.lru_cache(maxsize=16)
def _feature_fn(graphdef, mesh):
    """`(params, buffers, uint8 images) -> features`, jitted once per architecture and mesh, output replicated."""
    return jax.jit(lambda p, b, x: features_of(nnx.merge(graphdef, p, b or {}), normalize(x)),
                   out_shardings=NamedSharding(mesh, P()))


def extract_features(fn, params, buffers, loader, data_cfg, split: str, *, batch_size: int, image_size: int,
                     mesh) -> tuple[np.ndarray, np.ndarray]:
    """Runs `fn(params, buffers, uint8 images) -> [B, d]` (replicated output) over one eval pass of `split`."""
    it = loader.make_eval_iterator(data_cfg, split=split, batch_size=batch_size // jax.process_count(),
                                   image_size=image_size, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    gather = replicator(mesh)
    feats, labels = [], []
    for batch in it:
        g = global_batch(batch, mesh)
        f = fn(params, buffers, g["image"])
        lab, mask = gather(g["label"], g["mask"])
        keep = np.asarray(mask)
        feats.append(np.asarray(f)[keep])
        labels.append(np.asarray(lab)[keep])
    if not feats:
        raise RuntimeError(f"split {split!r} gave no batches")
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)
