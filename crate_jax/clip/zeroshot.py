"""Zero-shot classification and image↔text retrieval for a two-tower model (docs/clipa.md §Recipes), and
the two evaluators built on them (`type='zeroshot'`, `type='retrieval'` in `config.evals`).

* Zero-shot: every class name is put into every prompt template (`"a photo of a {}."`), the
  prompts are embedded by the text tower, averaged per class and re-normalised (the CLIP recipe);
  an image is assigned the class whose embedding has the largest cosine. Metrics: top-1, top-5.
* Retrieval: the images and (first) captions of held-out shards are embedded; for each image the
  captions are ranked by cosine, and vice versa. Metrics: recall@1/5/10 both ways (`i2t_r1`, ...).

Images are embedded under the run's mesh: each process feeds its own eval batches, the jitted
encoder runs on the global batch, and the embeddings (with labels and masks, so the rows stay
aligned) are gathered to every process. Class and caption prompts are known to every process and
are fed whole. Class names and templates are read from files: one per line (templates contain
`{}`), or a JSON file with a `classes` list (as `crate_jax.data.image_text.synth_scenes` writes); a bare file
name is looked up in `crate_jax/eval/assets/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from crate_jax.eval.names import load_classnames, load_templates  # noqa: F401 - also used as Z.load_* by tests
from crate_jax.errors import ConfigError
from crate_jax.models.preprocess import normalize
from crate_jax.parallel import sharding as sh
from crate_jax.train import metrics as M
from crate_jax.train.evaluation import schedule_of

RECALL_KS = (1, 5, 10)


# Class names and prompt templates: crate_jax/eval/names.py



# ------------------------------------------------------------------------------------ embedding
class Embedder:
    """Jitted, mesh-sharded encoders of a two-tower model.

    `graphdef` as the engine keeps it; `global_batch` rows per call (divisible by the mesh's
    data×fsdp and by the process count). The jitted functions are built once, so evaluating new
    parameters (`bind`) does not recompile.
    """

    def __init__(self, graphdef, mesh, global_batch: int, params=None, buffers=None):
        self.params, self.buffers, self.mesh, self.global_batch = params, buffers or {}, mesh, int(global_batch)
        self.local_batch = self.global_batch // jax.process_count()

        def images(p, b, im, *extra):
            return (nnx.merge(graphdef, p, b).encode_image(normalize(im)),) + extra

        def texts(p, b, tok):
            return nnx.merge(graphdef, p, b).encode_text(tok)

        self._images = jax.jit(images)
        self._texts = jax.jit(texts)

    def bind(self, params, buffers=None) -> "Embedder":
        """Use `params` (the engine's parameter dict, possibly sharded) from now on."""
        self.params, self.buffers = params, buffers or {}
        return self

    def _global(self, local: np.ndarray):
        return jax.make_array_from_process_local_data(sh.batch_sharding(self.mesh, local.ndim), local)

    def images(self, images: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
        """This process's `[b, S, S, 3]` uint8 images (plus aligned per-row arrays such as labels or
        tokens) -> every process's rows gathered: `(zimg [B, E], *extra)` as numpy."""
        arrays = [self._global(np.asarray(images))] + [self._global(np.asarray(e)) for e in extra]
        out = self._images(self.params, self.buffers, *arrays)
        return tuple(np.asarray(x) for x in multihost_utils.process_allgather(out, tiled=True))

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """`[n, L]` tokens (the same on every process) -> `[n, E]` normalised embeddings."""
        n, B = tokens.shape[0], self.global_batch
        out = []
        for s in range(0, n, B):
            chunk = tokens[s:s + B]
            pad = np.zeros((B - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
            full = np.concatenate([chunk, pad]) if pad.shape[0] else chunk
            arr = jax.make_array_from_callback(full.shape, sh.batch_sharding(self.mesh, 2), lambda idx: full[idx])
            z = multihost_utils.process_allgather(self._texts(self.params, self.buffers, arr), tiled=True)
            out.append(np.asarray(z)[:chunk.shape[0]])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def class_embeddings(embedder: Embedder, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """`[C, E]`: per class, the mean of its normalised prompt embeddings, re-normalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    z = embedder.texts(tokenizer(prompts)).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


# ---------------------------------------------------------------------------------------- metrics
def zero_shot(embedder: Embedder, batches: Iterable[dict], class_emb: np.ndarray) -> dict[str, float]:
    """Top-1 / top-5 accuracy over eval batches `{'image', 'label', 'mask'}` (padding rows masked)."""
    hits1 = hits5 = count = 0
    k = min(5, class_emb.shape[0])
    for batch in batches:
        zimg, label, mask = embedder.images(batch["image"], np.asarray(batch["label"], np.int32),
                                            np.asarray(batch["mask"], bool))
        logits = zimg @ class_emb.T
        top = np.argsort(-logits, axis=1)[:, :k]
        hits1 += int(np.sum((top[:, 0] == label) & mask))
        hits5 += int(np.sum(np.any(top == label[:, None], axis=1) & mask))
        count += int(mask.sum())
    if count == 0:
        raise ValueError("zero-shot evaluation saw no examples; check the eval data")
    return {"top1": hits1 / count, "top5": hits5 / count, "count": float(count)}


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = RECALL_KS, chunk: int = 4096) -> dict:
    """Image `i` matches caption `i`. `i2t_rK`: fraction of images whose caption ranks in the top K
    among all captions; `t2i_rK` the reverse. Ties count against the match (rank = number of
    candidates scoring at least as high, minus itself)."""
    n = zimg.shape[0]
    out = {}
    for name, a, b in (("i2t", zimg, ztxt), ("t2i", ztxt, zimg)):
        ranks = np.empty(n, np.int64)
        for s in range(0, n, chunk):
            sim = a[s:s + chunk] @ b.T  # [c, n]
            pos = sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])]
            ranks[s:s + sim.shape[0]] = np.sum(sim >= pos[:, None], axis=1) - 1
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(ranks < k))
    return out


def retrieval(embedder: Embedder, batches: Iterable[dict]) -> dict[str, float]:
    """Recall@1/5/10 both ways over eval batches `{'image', 'text', 'mask'}`."""
    zi, zt = [], []
    for batch in batches:
        zimg, tokens, mask = embedder.images(batch["image"], np.asarray(batch["text"], np.int32),
                                             np.asarray(batch["mask"], bool))
        zi.append(zimg[mask])
        zt.append(tokens[mask])
    if not zi or sum(len(z) for z in zi) == 0:
        raise ValueError("retrieval evaluation saw no examples; check the eval shards")
    zimg, tokens = np.concatenate(zi), np.concatenate(zt)
    ztxt = embedder.texts(tokens)
    return dict(recall_at_k(zimg, ztxt), count=float(len(zimg)))


# ------------------------------------------------------------------------------------ evaluators
@runtime_checkable
class ImageTextTask(Protocol):
    """What the zero-shot and retrieval evaluators need of a run's task (`crate_jax.clip.task.ClipTask` has it):
    its eval data, an embedder of images and texts for a train state, and its tokenizer."""

    tokenizer: Any

    def eval_iterator(self, *args, **kwargs): ...

    def embedder(self, state, global_batch: int): ...


def _clip_task(task, key: str) -> ImageTextTask:
    """The run's task, if it can serve these evaluators (an `ImageTextTask`)."""
    if not isinstance(task, ImageTextTask):
        raise ConfigError(f"{key}: zero-shot and retrieval evaluate a two-tower model; this run's task is "
                          f"{type(task).__name__}")
    return task


class ZeroShotEvaluator:
    """`type='zeroshot'`: top-1 / top-5 (and `count`) of zero-shot classification.

    Spec keys: `source` 'shards' (`shards` pattern, `label_key` in each sample's json, default 'label')
    or 'tfds' (`name`, `data_dir`, `split`, `decoder` 'pil' | 'tfds'); `classnames` and `templates`
    files (a bare name is looked up in `crate_jax/eval/assets/`); `skip_if_missing` (a dataset that
    cannot be opened is reported once and skipped); `every`, `batch_size`."""

    def __init__(self, name: str, spec, task, mesh):
        key = f"config.evals.{name}"
        self.name, self.spec, self.task = name, spec, _clip_task(task, key)
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        if spec.get("source", "shards") not in ("shards", "tfds"):
            raise ConfigError(f"{key}.source: got {spec.get('source')!r}, expected 'shards' or 'tfds'")
        for field in ("classnames", "templates") + (("shards",) if spec.get("source", "shards") == "shards" else ()):
            if not spec.get(field):
                raise ConfigError(f"{key}.{field} is not set")
        self._classes = None
        self._skipped = False

    def run(self, state) -> dict[str, float]:
        if self._skipped:
            return {}
        try:
            it = self.task.eval_iterator(self.spec, with_text=False, batch=self.batch_size // jax.process_count())
        except (ValueError, FileNotFoundError) as e:
            if not self.spec.get("skip_if_missing", False):
                raise
            M.console(f"zero-shot eval '{self.name}' skipped: its data is not available ({e})")
            self._skipped = True
            return {}
        embedder = self.task.embedder(state, self.batch_size)
        classes = class_embeddings(embedder, self.task.tokenizer, load_classnames(self.spec.classnames),
                                   load_templates(self.spec.templates))
        return zero_shot(embedder, it, classes)


class RetrievalEvaluator:
    """`type='retrieval'`: image↔text recall@1/5/10 (and `count`) on held-out shards (`shards`)."""

    def __init__(self, name: str, spec, task, mesh):
        key = f"config.evals.{name}"
        self.name, self.spec, self.task = name, spec, _clip_task(task, key)
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        if spec.get("source", "shards") != "shards" or not spec.get("shards"):
            raise ConfigError(f"{key}: retrieval reads webdataset shards: set source='shards' and shards=PATTERN")

    def run(self, state) -> dict[str, float]:
        it = self.task.eval_iterator(self.spec, with_text=True, batch=self.batch_size // jax.process_count())
        return retrieval(self.task.embedder(state, self.batch_size), it)
