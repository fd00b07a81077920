"""Per-process classification iterators (train: infinite, resumable; eval: one padded pass).

Train stream (one per process, built on grain):

  source --shuffle(seed, reshuffled every epoch)--> repeat forever
         --random_map(decode + augment, rng from (seed, global position))
         --[process_index::process_count]--> reader threads (+ optional worker processes)
         --> TrainIterator: skip + count + log undecodable images, stack full batches

Every process builds the same global, per-epoch shuffled order and takes every
``process_count``-th element, so at any step the processes together have read one
contiguous prefix of that order: each epoch is covered once, with no overlap (a process
that skips undecodable images reads that many elements further ahead). The
augmentation rng depends only on the seed and the global position, so a run resumed from
``get_state()`` produces exactly the batches the uninterrupted run would have.

Eval: process ``p`` of ``P`` reads the contiguous block ``[N*p//P, N*(p+1)//P)`` in order;
every process yields the same number of batches, ``ceil(ceil(N/P) / batch_size)``; the
tail is padded and ``mask`` marks real examples.

The generic pieces (``ImageRecordTransform``, ``train_stream``, ``to_iter_dataset``,
``TrainIterator``, ``EvalIterable``, ``eval_shard``) know nothing about labels and are meant
for other record kinds too (e.g. image-text): any source whose records are
``{'image': bytes | array, ..., 'id': str}`` or ``{'error': str, 'id': str}`` works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from crate_jax.data.batching import SkipCounter, pad_rows, stack_rows
from crate_jax.data.decode import decode_record
from crate_jax.data.images import augment, classification
from crate_jax.data.images.classification import default_data_config, resolve_config

__all__ = [
    "default_data_config",
    "resolve_config",
    "make_train_iterator",
    "make_eval_iterator",
    "num_classes",
    "num_examples",
    "ImageRecordTransform",
    "train_stream",
    "to_iter_dataset",
    "eval_shard",
    "TrainIterator",
    "EvalIterable",
]

_EVAL_CROP_FRACTION = 0.875  # resize_small default: image_size / 0.875 (256 for 224)


# ----------------------------------------------------------------------------- generic pieces


@dataclasses.dataclass(frozen=True)
class ImageRecordTransform:
    """Record -> element: decodes ``record['image']``, applies ``image_fn``, copies ``keep`` keys.

    Usable as ``MapDataset.random_map(t, seed=...)`` (called with ``(record, rng)``) or
    ``MapDataset.map(t)``. A record carrying ``'error'``, or an image that does not decode,
    becomes the bad-element marker ``{'error': str, 'id': str}``, which the iterators skip,
    count and log. Elements are ``{'image': image_fn(...), **{k: record[k] for k in keep}}``.
    """

    image_fn: Callable[[Image.Image, np.random.Generator | None], np.ndarray]
    keep: tuple[str, ...] = ("label",)

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        img, bad = decode_record(record)
        if bad is not None:
            return bad
        out = {"image": self.image_fn(img, rng)}
        for key in self.keep:
            out[key] = record[key]
        return out


def _derived_seeds(seed: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed), both in [0, 2**32), from one user seed."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shuffle_seed, aug_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(aug_seed)


def train_stream(
    source: Sequence[Any],
    transform: Callable[[Any, np.random.Generator], Any],
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This process's infinite train stream: global per-epoch shuffle, augment, then shard.

    Element ``i`` of the result is global position ``process_index + i * process_count`` of
    the shuffled, repeated source (epoch ``e`` is a fresh permutation of all ``len(source)``
    records); its augmentation rng depends only on ``(seed, global position)``.
    """
    _check_process(process_index, process_count)
    if len(source) == 0:
        raise ValueError(f"train source {source!r} is empty")
    shuffle_seed, aug_seed = _derived_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(transform, seed=aug_seed)
    return ds[process_index::process_count]


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed and
    # the first access raises UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_iter_dataset(
    ds: grain.MapDataset,
    *,
    num_threads: int = 8,
    prefetch_buffer_size: int = 256,
    worker_count: int = 0,
    worker_buffer_size: int = 16,
) -> grain.IterDataset:
    """Reads ``ds`` in order with ``num_threads`` threads, optionally in ``worker_count`` processes.

    The element order does not depend on either count (workers interleave round-robin).
    """
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return it


def eval_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of the contiguous block of eval examples read by ``process_index``."""
    _check_process(process_index, process_count)
    return num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")


def _bad_images(limit: int) -> SkipCounter:
    """Counts, logs and limits the bad elements ``{'error', 'id'}`` of a stream (see ``_skip``)."""
    return SkipCounter(("bad_images",), max_in_a_row=limit, advice=(
        "This is a broken data set or the wrong decoder (config.data.tfds_decoder), not a few bad files; "
        "raise config.data.max_consecutive_bad if it really is expected."))


def _skip(skips: SkipCounter, element: Mapping[str, Any]) -> None:
    skips.skip("bad_images", f"{element.get('id', '?')}: {element['error']}")


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Full batches from an (infinite) grain element stream, skipping bad elements.

    ``next(it)`` stacks ``batch_size`` good elements, e.g. ``{'image': uint8 [b, S, S, 3],
    'label': int32 [b]}``. ``get_state()`` is a JSON-serialisable dict: the grain reader
    position plus counters and a fingerprint of what was read; ``set_state`` on a fresh
    iterator built the same way continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        batch_size: int,
        *,
        fingerprint: Mapping[str, Any] | None = None,
        epoch_size: int | None = None,
        max_consecutive_bad: int = 100,
    ):
        """Args:
        dataset: the element stream (e.g. ``to_iter_dataset(train_stream(...))``).
        batch_size: examples per batch (per process).
        fingerprint: JSON-able description of the stream (source, split, seed, process
          layout ...); ``set_state`` refuses a state saved under a different one.
        epoch_size: elements this process reads per epoch, ``len(source) / process_count``;
          only used for ``stats()['epoch']``.
        max_consecutive_bad: stop with an error after this many bad elements in a row.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._fingerprint = dict(fingerprint or {})
        self._epoch_size = epoch_size
        self._bad = _bad_images(max_consecutive_bad)
        self._it = iter(dataset)
        self._elements = 0
        self._batches = 0

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self.batch_size:
            element = next(self._it)
            self._elements += 1
            if "error" in element:
                _skip(self._bad, element)
                continue
            self._bad.used()
            examples.append(element)
        self._batches += 1
        return stack_rows(examples)

    def get_state(self) -> dict[str, Any]:
        return {
            "reader": self._it.get_state(),
            "elements": self._elements,
            "batches": self._batches,
            "bad_images": self._bad["bad_images"],
            "fingerprint": dict(self._fingerprint),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self._fingerprint:
            diff = {
                k: (saved.get(k), self._fingerprint.get(k))
                for k in sorted(set(saved) | set(self._fingerprint))
                if saved.get(k) != self._fingerprint.get(k)
            }
            raise ValueError(
                "data-iterator state was saved for a different stream; differing fields "
                f"(saved, now): {diff}. Resume with the same data config, seed and process layout."
            )
        self._it.set_state(state["reader"])
        self._elements = int(state["elements"])
        self._batches = int(state["batches"])
        self._bad.restore({"bad_images": int(state["bad_images"])})

    def stats(self) -> dict[str, float]:
        """Cumulative counters (restored by ``set_state``): bad_images, examples, batches, epoch."""
        out = {
            "bad_images": self._bad["bad_images"],
            "examples": self._batches * self.batch_size,
            "batches": self._batches,
        }
        if self._epoch_size:
            out["epoch"] = self._elements / self._epoch_size
        return out

    def close(self) -> None:
        """Stops reader threads / worker processes (also done on garbage collection)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class EvalIterable:
    """One deterministic pass per ``iter()``: ``num_batches`` batches with a ``mask``.

    Each batch is the stacked good elements plus ``'mask': bool [b]`` (True = real example);
    bad elements are skipped (counted, logged) and the tail of the last batches is filled
    with ``pad_element`` and mask False.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        batch_size: int,
        num_batches: int,
        pad_element: Mapping[str, np.ndarray],
        *,
        max_consecutive_bad: int = 100,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_batches = num_batches
        self._dataset = dataset
        self._pad = {k: np.asarray(v) for k, v in pad_element.items()}
        self._bad = _bad_images(max_consecutive_bad)
        self._examples = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        it = iter(self._dataset)
        try:
            exhausted = False
            for _ in range(self.num_batches):
                examples = []
                while not exhausted and len(examples) < self.batch_size:
                    try:
                        element = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if "error" in element:
                        _skip(self._bad, element)
                        continue
                    self._bad.used()
                    examples.append(element)
                self._examples += len(examples)
                rows, mask = pad_rows(examples, self.batch_size, self._pad)
                yield {**stack_rows(rows), "mask": mask}
            if not exhausted and next(it, None) is not None:
                raise RuntimeError("eval shard holds more examples than num_batches * batch_size")
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def stats(self) -> dict[str, int]:
        """Cumulative over passes: bad_images, examples (real, unmasked)."""
        return {"bad_images": self._bad["bad_images"], "examples": self._examples}


# ----------------------------------------------------------------------------- classification API


def _train_augment(cfg: ml_collections.ConfigDict, image_size: int) -> augment.TrainAugment:
    return augment.TrainAugment(
        image_size=image_size,
        crop=cfg.augment,
        area_min=float(cfg.area_min) / 100.0,
        flip=bool(cfg.flip),
        randaug=None if cfg.randaug is None else (int(cfg.randaug[0]), float(cfg.randaug[1])),
    )


def _eval_preprocess(cfg: ml_collections.ConfigDict, image_size: int) -> augment.EvalPreprocess:
    if cfg.augment == "none":
        return augment.EvalPreprocess(image_size, None)
    resize_small = cfg.resize_small if cfg.resize_small is not None else round(image_size / _EVAL_CROP_FRACTION)
    if resize_small < image_size:
        raise ValueError(
            f"config.data.resize_small={resize_small} is smaller than image_size={image_size}; "
            f"use about image_size / 0.875 (e.g. 256 for 224), or None for that default"
        )
    return augment.EvalPreprocess(image_size, int(resize_small))


def _reader_options(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    return dict(
        num_threads=int(cfg.num_threads),
        prefetch_buffer_size=int(cfg.prefetch_buffer_size),
        worker_count=int(cfg.worker_count),
        worker_buffer_size=int(cfg.worker_buffer_size),
    )


def _check_size(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator:
    """This process's infinite train iterator over ``data_cfg.train_split``.

    Yields ``{'image': uint8 [batch_size, image_size, image_size, 3], 'label': int32
    [batch_size]}``; see ``TrainIterator`` for ``get_state`` / ``set_state`` / ``stats``.
    """
    cfg = resolve_config(data_cfg)
    _check_size("batch_size", batch_size)
    _check_size("image_size", image_size)
    source = classification.make_source(cfg, cfg.train_split, "train_split")
    transform = ImageRecordTransform(_train_augment(cfg, image_size), keep=("label",))
    stream = train_stream(source, transform, seed=seed, process_index=process_index, process_count=process_count)
    fingerprint = {
        "source": cfg.source,
        "dataset": cfg.name if cfg.source == "tfds" else cfg.source,  # not data_dir: data may move
        "split": cfg.train_split,
        "num_examples": len(source),
        "seed": int(seed),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "worker_count": int(cfg.worker_count),
    }
    return TrainIterator(
        to_iter_dataset(stream, **_reader_options(cfg)),
        batch_size,
        fingerprint=fingerprint,
        epoch_size=len(source) / process_count,
        max_consecutive_bad=int(cfg.max_consecutive_bad),
    )


def make_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    split: str | None = None,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalIterable:
    """One deterministic pass over ``split`` (default ``data_cfg.eval_split``), this process's block.

    Yields ``{'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask': bool [b]}``; all
    processes yield the same number of batches and together see every example once.
    """
    cfg = resolve_config(data_cfg)
    _check_size("batch_size", batch_size)
    _check_size("image_size", image_size)
    split = cfg.eval_split if split is None else split
    source = classification.make_source(cfg, split, "eval_split")
    start, stop = eval_shard(len(source), process_index, process_count)
    transform = ImageRecordTransform(_eval_preprocess(cfg, image_size), keep=("label",))
    ds = grain.MapDataset.source(source)[start:stop].map(transform)
    per_process = math.ceil(len(source) / process_count)
    pad = {"image": np.zeros((image_size, image_size, 3), np.uint8), "label": np.int32(0)}
    return EvalIterable(
        to_iter_dataset(ds, **_reader_options(cfg)),
        batch_size,
        max(1, math.ceil(per_process / batch_size)),
        pad,
        max_consecutive_bad=int(cfg.max_consecutive_bad),
    )


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the configured dataset."""
    return classification.source_num_classes(resolve_config(data_cfg))


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in ``split`` (all processes together)."""
    return len(classification.make_source(resolve_config(data_cfg), split))
