"""Image-text pairs from a TFDS dataset directory, read as CLIPA reads DataComp (docs/clipa.md §Recipes).

CLIPA opens a TFDS-format copy of its data with ``tfds.builder_from_directory(data_dir)`` and uses
the features ``jpg`` (image) and ``txt`` (caption). Here the directory is opened the same way, read
with random access (``builder.as_data_source``, ArrayRecord; no TensorFlow) and fed through grain:

  source --shuffle(seed), a fresh permutation every epoch--> repeat forever
         --random_map(decode + CLIPA inception crop + caption choice; rng from (seed, position))
         --[process_index::process_count]--> grain reader threads
         --> skip + count + log undecodable images, batch, tokenise

Every process walks the same global order and takes every ``process_count``-th example, so each
epoch is covered once across processes. The iterator's state is grain's position plus the skip
counts: ``set_state`` gives exactly the batches of the uninterrupted run.

The train and eval iterators have the API of ``crate_jax.data.image_text.shard_train`` / ``shard_eval`` (same
batch layout, same ``get_state`` / ``set_state`` / ``stats``, the same per-sample ops from
``rows``), with a dataset directory and split in place of a shard pattern.
``crate_jax.data.image_text.arrayrecord_convert`` writes such directories from webdataset shards.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from crate_jax.data.batching import SkipCounter
from crate_jax.data.image_text.captions import parse_captions
from crate_jax.data.image_text.rows import eval_batch, eval_row, train_batch, train_row
from crate_jax.data.seeding import sample_rng

STATE_VERSION = 1
IMAGE_FEATURE, TEXT_FEATURE = "jpg", "txt"


def open_source(data_dir: str | os.PathLike, split: str):
    """Random-access source (a grain ``RandomAccessDataSource``) of ``data_dir``'s ``split``.

    Examples are dicts with ``'jpg'`` as the *encoded* image bytes (TFDS decoding is skipped; the
    pipeline decodes with PIL) and ``'txt'`` as bytes (or a list of them), plus any other features.
    """
    import tensorflow_datasets as tfds

    data_dir = os.fspath(data_dir)
    if not os.path.exists(os.path.join(data_dir, "dataset_info.json")) and "://" not in data_dir:
        raise FileNotFoundError(f"{data_dir} is not a TFDS dataset directory (no dataset_info.json); pass the "
                                "versioned builder directory, e.g. .../datacomp1b/1.0.0")
    builder = tfds.builder_from_directory(data_dir)
    features = set(builder.info.features.keys())
    missing = {IMAGE_FEATURE, TEXT_FEATURE} - features
    if missing:
        raise ValueError(f"{data_dir}: dataset has features {sorted(features)}, but image-text reading needs "
                         f"'{IMAGE_FEATURE}' (image) and '{TEXT_FEATURE}' (caption); missing {sorted(missing)}")
    if split not in builder.info.splits:
        raise ValueError(f"{data_dir}: no split {split!r}; available: {sorted(builder.info.splits.keys())}")
    return builder.as_data_source(split, decoders={IMAGE_FEATURE: tfds.decode.SkipDecoding()})


def _captions(example: Mapping[str, Any]) -> list[str]:
    value = example[TEXT_FEATURE]
    if isinstance(value, (bytes, str)):
        value = [value]
    out: list[str] = []
    for v in value:  # a list / array of captions (a Sequence(Text) feature) or one caption
        text = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        out.extend(parse_captions(text, None))
    return out


def _image_bytes(example: Mapping[str, Any]) -> bytes | None:
    value = example.get(IMAGE_FEATURE)
    return bytes(value) if isinstance(value, (bytes, bytearray, np.bytes_)) else None


class _TrainTransform:
    """Example + rng -> ``{'image' [S, S, 3], 'caption', 'key'}`` or a skip marker (``rows``)."""

    def __init__(self, image_size: int, area_min: float, area_max: float, fast_decode: bool, name: str):
        self.image_size, self.area_min, self.area_max = image_size, area_min, area_max
        self.fast_decode, self.name = fast_decode, name

    def __call__(self, indexed: tuple[int, Mapping[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        index, example = indexed
        row = train_row(f"{self.name}[{index}]", _image_bytes(example), _captions(example), rng,
                        image_size=self.image_size, area_min=self.area_min, area_max=self.area_max,
                        fast_decode=self.fast_decode)
        return row if "error" in row else {**row, "key": _key(example, index)}


def _key(example: Mapping[str, Any], index: int) -> str:
    key = example.get("key", str(index))
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


class _Indexed:
    """Random-access view returning ``(index, example)`` so that warnings can name the example."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self.source[i]


class TfdsTrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless batches ``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L]}``, exactly resumable."""

    def __init__(self, data_dir: str | os.PathLike, *, split: str, batch_size: int, image_size: int, tokenizer,
                 seed: int, process_index: int, process_count: int, area_min: float, area_max: float,
                 num_threads: int, prefetch: int, fast_decode: bool, with_keys: bool):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        source = open_source(data_dir, split)
        if len(source) < process_count:
            raise ValueError(f"{data_dir} split {split!r} has {len(source)} examples for {process_count} processes")
        self.batch_size, self.tokenizer = batch_size, tokenizer
        self.with_keys = with_keys
        self._config = {"split": split, "num_examples": len(source), "seed": seed,
                        "process_index": process_index, "process_count": process_count}
        name = f"{os.path.basename(os.path.normpath(os.fspath(data_dir)))}/{split}"
        transform = _TrainTransform(image_size, area_min, area_max, fast_decode, name)
        shuffle_seed, aug_seed = (int(x) for x in sample_rng(seed, 0x7FD5).integers(0, 2**31, size=2))
        ds = grain.MapDataset.source(_Indexed(source)).shuffle(seed=shuffle_seed).repeat(None)
        ds = ds.random_map(transform, seed=aug_seed)[process_index::process_count]
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch * batch_size))
        self._ds = ds.to_iter_dataset(options)
        self._it = iter(self._ds)
        self._stats = SkipCounter()

    def __iter__(self) -> TfdsTrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            element = next(self._it)
            if "error" in element:
                self._stats.skip(element["kind"], element["error"])
                continue
            rows.append(element)
            self._stats.used("samples")
        return train_batch(rows, self.tokenizer, self.with_keys)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch returned."""
        return {"version": STATE_VERSION, "config": dict(self._config), "grain": self._it.get_state(),
                "stats": self._stats.snapshot()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"tfds iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = state["config"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._config.items() if saved.get(k) != v]
        if diff:
            raise ValueError("cannot resume tfds iterator with different settings: " + "; ".join(diff))
        self._it = iter(self._ds)
        self._it.set_state(state["grain"])
        self._stats.restore(state["stats"])

    def stats(self) -> dict[str, int]:
        return self._stats.snapshot()

    def close(self) -> None:
        self._it = None


def make_train_iterator(
    data_dir: str | os.PathLike, *, split: str = "train", batch_size: int, image_size: int, tokenizer,
    seed: int = 0, process_index: int = 0, process_count: int = 1, area_min: float = 40, area_max: float = 100,
    num_threads: int | None = None, prefetch: int = 2, fast_decode: bool = False, with_keys: bool = False,
) -> TfdsTrainIterator:
    """This process's endless train iterator over a TFDS directory (see the module docstring).

    Args as ``crate_jax.data.image_text.shard_train.make_train_iterator``; ``data_dir`` is the builder directory
    (with ``dataset_info.json``), ``split`` e.g. ``'train'`` or ``'full'``. The shuffle is a full
    global permutation per epoch, so there is no shuffle buffer. ``prefetch`` is in batches.
    ``with_keys`` adds ``'key'``: the ``key`` feature if the dataset has one, else the index.
    """
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    return TfdsTrainIterator(data_dir, split=split, batch_size=batch_size, image_size=image_size,
                             tokenizer=tokenizer, seed=seed, process_index=process_index,
                             process_count=process_count, area_min=area_min, area_max=area_max,
                             num_threads=num_threads, prefetch=prefetch, fast_decode=fast_decode,
                             with_keys=with_keys)


class _EvalTransform:
    """Example -> eval row or skip marker (``rows.eval_row``)."""

    def __init__(self, image_size: int, label_key: str | None, need_caption: bool, fast_decode: bool, name: str):
        self.image_size, self.label_key, self.need_caption = image_size, label_key, need_caption
        self.fast_decode, self.name = fast_decode, name

    def __call__(self, indexed: tuple[int, Mapping[str, Any]]) -> dict[str, Any]:
        index, example = indexed
        key = self.label_key

        def label() -> int:  # an integer feature, else a field of the json feature
            return example[key] if key in example else json.loads(example["json"])[key]

        return eval_row(f"{self.name}[{index}]", _key(example, index), _image_bytes(example), _captions(example),
                        need_caption=self.need_caption, label=None if key is None else label,
                        label_name=f"label {key!r}", image_size=self.image_size, fast_decode=self.fast_decode)


class TfdsEvalIterator(Iterator[dict[str, Any]]):
    """One ordered pass over this process's contiguous block ``[N p / P, N (p+1) / P)``.

    Every process yields ``ceil(ceil(N / P) / B)`` batches; batch layout as
    ``crate_jax.data.image_text.shard_eval.EvalIterator`` (``image``, ``mask``, optional ``text``, ``label``,
    ``caption``, ``key``).
    """

    def __init__(self, data_dir, *, split, batch_size, image_size, tokenizer, process_index, process_count,
                 label_key, with_captions, with_keys, num_threads, fast_decode):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        source = open_source(data_dir, split)
        n = len(source)
        lo, hi = n * process_index // process_count, n * (process_index + 1) // process_count
        self.num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
        name = f"{os.path.basename(os.path.normpath(os.fspath(data_dir)))}/{split}"
        ds = grain.MapDataset.source(_Indexed(source))[lo:hi].map(
            _EvalTransform(image_size, label_key, tokenizer is not None or with_captions, fast_decode, name))
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                             prefetch_buffer_size=2 * batch_size)))
        self.batch_size, self.image_size, self.tokenizer = batch_size, image_size, tokenizer
        self.label_key, self.with_captions, self.with_keys = label_key, with_captions, with_keys
        self._stats = SkipCounter()
        self._emitted = 0

    def stats(self) -> dict[str, int]:
        return self._stats.snapshot()

    def __iter__(self) -> TfdsEvalIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._emitted >= self.num_batches:
            raise StopIteration
        rows: list[dict[str, Any]] = []
        for element in self._it:
            if "error" in element:
                self._stats.skip(element["kind"], element["error"])
                continue
            self._stats.used("samples")
            rows.append(element)
            if len(rows) == self.batch_size:
                break
        self._emitted += 1
        return eval_batch(rows, batch_size=self.batch_size, image_size=self.image_size, tokenizer=self.tokenizer,
                          labels=self.label_key is not None, captions=self.with_captions, keys=self.with_keys)


def make_eval_iterator(
    data_dir: str | os.PathLike, *, split: str, batch_size: int, image_size: int, tokenizer=None,
    process_index: int = 0, process_count: int = 1, label_key: str | None = None, with_captions: bool = False,
    with_keys: bool = False, num_threads: int | None = None, fast_decode: bool = False,
) -> TfdsEvalIterator:
    """One pass, resize_small + central crop, padded last batch with ``'mask'``; every process runs
    the same number of batches. ``label_key`` names an integer feature or a field of the ``json``
    feature."""
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    return TfdsEvalIterator(data_dir, split=split, batch_size=batch_size, image_size=image_size,
                            tokenizer=tokenizer, process_index=process_index, process_count=process_count,
                            label_key=label_key, with_captions=with_captions, with_keys=with_keys,
                            num_threads=num_threads, fast_decode=fast_decode)
