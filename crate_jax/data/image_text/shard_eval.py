"""Eval iterator over webdataset image-text shards: one ordered, centre-cropped pass in padded batches.

Each process reads its shards (shard ``i`` belongs to process ``i % process_count``) in listed
order; the first caption and an optional json label come with each image (``rows``).
With several processes every one runs the same number of batches (a header-only count of all
shards, :func:`eval_num_batches`), the last ones padded and masked.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from crate_jax.data.batching import SkipCounter
from crate_jax.data.image_text.captions import parse_captions
from crate_jax.data.image_text.rows import eval_batch, eval_row
from crate_jax.data.shard_patterns import check_filesystems, expand_pattern
from crate_jax.data.shard_stream import process_shards
from crate_jax.data.tar_reader import RawSample, ShardError, count_samples, iter_shard


class EvalIterator(Iterator[dict[str, Any]]):
    """One ordered pass over this process's shards, centre-cropped, in batches of exactly ``B``.

    Batch: ``'image'`` uint8 ``[B, S, S, 3]``, ``'mask'`` bool ``[B]`` (False on padding rows),
    ``'text'`` int32 ``[B, L]`` if a tokenizer was given, ``'label'`` int32 ``[B]`` (-1 on padding) if
    ``label_key`` was given, ``'caption'`` list of ``B`` str ('' on padding) if ``with_captions``, and
    ``'key'`` list of str if ``with_keys``. With ``num_batches`` set, exactly that many batches come
    out (all-padding batches at the end), so that every process runs the same number of steps.
    """

    def __init__(self, paths: Sequence[str], *, batch_size: int, image_size: int, tokenizer,
                 process_index: int, process_count: int, label_key: str | None, with_captions: bool,
                 with_keys: bool, num_batches: int | None, fast_decode: bool, num_threads: int):
        self.paths = list(paths)
        check_filesystems(self.paths)
        self.mine = process_shards(self.paths, process_index, process_count)
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="eval-decode")
                      if num_threads > 1 else None)
        self.batch_size, self.image_size, self.tokenizer = batch_size, image_size, tokenizer
        self.label_key, self.with_captions, self.with_keys = label_key, with_captions, with_keys
        self.num_batches, self.fast_decode = num_batches, fast_decode
        self._stats = SkipCounter()
        self._samples = self._iter_samples()
        self._emitted = 0
        self._done = False

    def _iter_samples(self) -> Iterator[RawSample]:
        for shard in self.mine:
            try:
                yield from iter_shard(self.paths[shard], shard)
            except ShardError as e:
                self._stats.skip("bad_shards" if e.kind == "bad" else "truncated_shards", str(e))

    def stats(self) -> dict[str, int]:
        return self._stats.snapshot()

    def _prepare(self, s: RawSample) -> dict[str, Any]:
        """A row or a skip marker (``rows``). Runs in the decode threads."""
        label_key = self.label_key
        return eval_row(f"{s.path}: sample {s.key!r}", f"{s.path}:{s.key}", s.image, parse_captions(s.text, s.json),
                        need_caption=self.tokenizer is not None or self.with_captions,
                        label=None if label_key is None else lambda: json.loads(s.json)[label_key],
                        label_name=f"json[{label_key!r}]", image_size=self.image_size,
                        fast_decode=self.fast_decode)

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        while not self._done and len(rows) < self.batch_size:
            chunk = list(itertools.islice(self._samples, self.batch_size - len(rows)))
            if len(chunk) < self.batch_size - len(rows):
                self._done = True
            results = self._pool.map(self._prepare, chunk) if self._pool else map(self._prepare, chunk)
            for r in results:
                if "error" in r:
                    self._stats.skip(r["kind"], r["error"])
                else:
                    self._stats.used("samples")
                    rows.append(r)
        if self._done and self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if not rows:
            if self.num_batches is None or self._emitted >= self.num_batches:
                raise StopIteration
        elif self.num_batches is not None and self._emitted >= self.num_batches:
            raise RuntimeError(f"this process's shards hold more than num_batches={self.num_batches} "
                               f"eval batches of {self.batch_size}; raise num_batches")
        self._emitted += 1
        return self._batch(rows)

    def _batch(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return eval_batch(rows, batch_size=self.batch_size, image_size=self.image_size, tokenizer=self.tokenizer,
                          labels=self.label_key is not None, captions=self.with_captions, keys=self.with_keys)


def eval_num_batches(pattern: str | Sequence[str], batch_size: int, process_count: int) -> int:
    """Batches every process must run so that all fit (max over processes of ceil(n_p / B)).

    Reads only tar headers; every process computes the same number without communicating.
    """
    paths = expand_pattern(pattern)
    counts = [0] * process_count
    for i, path in enumerate(paths):
        try:
            counts[i % process_count] += count_samples(path)
        except ShardError:
            pass
    return max(math.ceil(c / batch_size) for c in counts)


def make_eval_iterator(
    pattern: str | Sequence[str], *, batch_size: int, image_size: int, tokenizer=None,
    process_index: int = 0, process_count: int = 1, label_key: str | None = None,
    with_captions: bool = False, with_keys: bool = False, num_batches: int | str | None = "auto",
    fast_decode: bool = False, num_threads: int | None = None,
) -> EvalIterator:
    """One pass over this process's shards (listed order): resize_small + central crop to ``S``.

    The last batch is padded (``'mask'``). ``num_batches='auto'`` (default) pads every process to
    the same number of batches when ``process_count > 1`` (a header-only scan of all shards, see
    :func:`eval_num_batches`); an int fixes it; None lets each process stop on its own.
    ``label_key``: json field holding an integer class label (e.g. ``'label'`` in synthetic
    scenes). ``num_threads``: decode threads (default ``min(8, cpu count)``). See
    :class:`EvalIterator` for the batch layout.
    """
    paths = expand_pattern(pattern)
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if num_batches == "auto":
        num_batches = eval_num_batches(paths, batch_size, process_count) if process_count > 1 else None
    return EvalIterator(paths, batch_size=batch_size, image_size=image_size, tokenizer=tokenizer,
                        process_index=process_index, process_count=process_count, label_key=label_key,
                        with_captions=with_captions, with_keys=with_keys, num_batches=num_batches,
                        fast_decode=fast_decode, num_threads=num_threads)
