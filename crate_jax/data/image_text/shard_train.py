"""Train iterator over webdataset image-text shards: shuffled, decoded, batched, exactly resumable.

Train stream of one process (``make_train_iterator``):

  shards[process_index::process_count]                  (shard i belongs to process i % n)
    -> per-epoch shard order, a permutation drawn from (seed, process, epoch)
    -> ``cycle_length`` shards open at once, read round-robin   (``shard_stream.ShardStream``)
    -> blocks of ``shuffle_buffer`` samples, each block permuted by (seed, process, block number)
    -> decode + CLIPA inception crop (docs/clipa.md §Recipes), rng from (seed, epoch, shard, sample index)
    -> skip undecodable images (counted, logged) -> batches {'image', 'text'}

The shuffle buffer is a *block* shuffle: the buffer is refilled with the next ``shuffle_buffer``
samples and emitted in a permuted order. Every random choice is a pure function of the seed and
of where a sample sits, so the state needed for an exact resume is small: the reader position
(epoch, shard-order cursor, the open shards' byte offsets) at which the current block was filled,
and how many of its samples were consumed. ``set_state`` re-reads that one block (raw bytes only)
and carries on; the batches that follow equal those of the uninterrupted run, mid-shard included.

Damaged input never stops the run: a corrupt image, a sample without caption or image, a
truncated or corrupt tar and a shard that cannot be opened or is not a tar are skipped, counted in
``stats()`` and logged with the shard path and sample key.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crate_jax.data.batching import SkipCounter
from crate_jax.data.image_text.captions import parse_captions
from crate_jax.data.image_text.rows import missing, train_batch, train_row
from crate_jax.data.seeding import sample_rng
from crate_jax.data.shard_patterns import check_filesystems, expand_pattern
from crate_jax.data.shard_stream import ShardStream, process_shards
from crate_jax.data.tar_reader import RawSample

STATE_VERSION = 1


@dataclass
class _Candidate:
    sample: RawSample
    epoch: int
    captions: list[str]


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless, exactly resumable batches ``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L]}``
    (plus ``'key'``, an object array of ``'shard_path:key'`` strings, if ``with_keys``).

    See the module docstring for the stream; build it with :func:`make_train_iterator`.
    """

    def __init__(self, paths: Sequence[str], *, batch_size: int, image_size: int, tokenizer, seed: int,
                 process_index: int, process_count: int, shuffle_buffer: int, cycle_length: int,
                 area_min: float, area_max: float, shuffle: bool, num_threads: int, prefetch: int,
                 fast_decode: bool, with_keys: bool):
        if batch_size < 1 or image_size < 1 or shuffle_buffer < 1 or cycle_length < 1:
            raise ValueError("batch_size, image_size, shuffle_buffer and cycle_length must be >= 1, got "
                             f"{batch_size}, {image_size}, {shuffle_buffer}, {cycle_length}")
        self.paths = list(paths)
        check_filesystems(self.paths)
        mine = process_shards(self.paths, process_index, process_count)
        self.batch_size, self.image_size, self.tokenizer = batch_size, image_size, tokenizer
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.shuffle_buffer, self.shuffle = shuffle_buffer, shuffle
        self.area_min, self.area_max, self.fast_decode = area_min, area_max, fast_decode
        self.with_keys, self.prefetch = with_keys, prefetch
        self._stats = SkipCounter()
        self._stream = ShardStream(self.paths, mine, seed=seed, process_index=process_index,
                                    cycle_length=cycle_length, shuffle=shuffle, stats=self._stats)
        self._cycle_length = cycle_length
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="shard-decode")
                      if num_threads > 1 else None)
        self._block: list[_Candidate] = []
        self._pos = 0
        self._blocks_filled = 0
        self._snapshot: dict[str, Any] | None = None  # stream state + stats before the current block
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._state = self._producer_state()
        self._closed = False

    # -- state ---------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"num_shards": len(self.paths), "first_shard": os.path.basename(self.paths[0]), "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count,
                "shuffle_buffer": self.shuffle_buffer, "cycle_length": self._cycle_length,
                "shuffle": self.shuffle}

    def _producer_state(self) -> dict[str, Any]:
        if self._snapshot is None:  # nothing read yet
            block = {"stream": self._stream.state(), "stats": self._stats.snapshot(),
                     "blocks_filled": self._blocks_filled}
            return {"version": STATE_VERSION, "config": self._config(), "block": block, "pos": 0,
                    "fresh": True, "stats": self._stats.snapshot()}
        return {"version": STATE_VERSION, "config": self._config(), "block": copy.deepcopy(self._snapshot),
                "pos": self._pos, "fresh": False, "stats": self._stats.snapshot()}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch returned by ``next``."""
        return copy.deepcopy(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes so that the following batches equal those of the uninterrupted run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"shard iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, now = state["config"], self._config()
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
        if diff:
            raise ValueError("cannot resume shard iterator with different settings: " + "; ".join(diff))
        self._stop_producer()
        block = state["block"]
        self._stream.restore(block["stream"])
        self._stats.restore(block["stats"])
        self._blocks_filled = int(block["blocks_filled"])
        self._block, self._pos, self._snapshot = [], 0, None
        if not state["fresh"]:
            self._fill_block()  # re-reads the block the saved position is in (counts its skips again)
            self._pos = int(state["pos"])
        counts = self._stats.snapshot()
        for k in ("samples", "bad_images", "missing_labels"):  # counted when samples are decoded
            counts[k] = int(state["stats"].get(k, 0))
        self._stats.restore(counts)
        self._state = copy.deepcopy(dict(state))

    def stats(self) -> dict[str, int]:
        """Counts up to the last batch returned: samples emitted and every kind of skip."""
        return {k: int(v) for k, v in self._state["stats"].items()}

    # -- reading -------------------------------------------------------------------------------

    def _fill_block(self) -> None:
        while True:
            self._snapshot = {"stream": self._stream.state(), "stats": self._stats.snapshot(),
                              "blocks_filled": self._blocks_filled}
            block: list[_Candidate] = []
            while len(block) < self.shuffle_buffer:
                item = self._stream.next_sample()
                if item is None:
                    break
                sample, epoch = item
                captions = parse_captions(sample.text, sample.json)
                bad = missing(f"{sample.path}: sample {sample.key!r}", sample.image, captions)
                if bad is not None:
                    self._stats.skip(bad["kind"], bad["error"])
                    continue
                self._stream.mark_usable()
                block.append(_Candidate(sample, epoch, captions))
            if block:
                break
        if self.shuffle:
            perm = sample_rng(self.seed, 0xB10C, self.process_index, self._blocks_filled).permutation(len(block))
            block = [block[i] for i in perm]
        self._blocks_filled += 1
        self._block, self._pos = block, 0

    def _next_candidates(self, n: int) -> list[_Candidate]:
        out = []
        while len(out) < n:
            if self._pos >= len(self._block):
                self._fill_block()
            take = min(n - len(out), len(self._block) - self._pos)
            out.extend(self._block[self._pos : self._pos + take])
            self._pos += take
        return out

    def _decode(self, c: _Candidate) -> dict[str, Any]:
        s = c.sample
        rng = sample_rng(self.seed, 0x5A3B1E, c.epoch, s.shard, s.index)
        return train_row(f"{s.path}: sample {s.key!r}", s.image, c.captions, rng, image_size=self.image_size,
                         area_min=self.area_min, area_max=self.area_max, fast_decode=self.fast_decode)

    def _produce(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            chunk = self._next_candidates(self.batch_size - len(rows))
            results = list(self._pool.map(self._decode, chunk)) if self._pool else [self._decode(c) for c in chunk]
            for c, r in zip(chunk, results):
                if "error" in r:
                    self._stats.skip(r["kind"], r["error"])
                    continue
                rows.append({**r, "key": f"{c.sample.path}:{c.sample.key}"})
                self._stats.used("samples")
        return train_batch(rows, self.tokenizer, self.with_keys)

    def _run_producer(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = (self._produce(), self._producer_state())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, re-raised by __next__
            q.put(e)

    def _stop_producer(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None
        self._stop = threading.Event()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("the shard iterator is closed")
        if self.prefetch <= 0:
            batch = self._produce()
            self._state = self._producer_state()
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._run_producer, args=(self._queue, self._stop),
                                            name="shard-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None
            raise item
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread and decode pool and closes open shards."""
        self._stop_producer()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._stream.close()
        self._closed = True

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_iterator(
    pattern: str | Sequence[str], *, batch_size: int, image_size: int, tokenizer, seed: int = 0,
    process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 10_000, cycle_length: int = 4,
    area_min: float = 40, area_max: float = 100, shuffle: bool = True, num_threads: int | None = None,
    prefetch: int = 2, fast_decode: bool = False, with_keys: bool = False,
) -> TrainIterator:
    """This process's endless train iterator over webdataset shards (see the module docstring).

    Args:
      pattern: shard pattern(s), e.g. ``'gs://b/shards/{00000..01023}.tar'`` (see ``shard_patterns.expand_pattern``).
      batch_size: per-process batch ``B``. image_size: ``S``. tokenizer: ``list[str] -> int32 [B, L]``.
      seed: seeds shard order, block shuffle, crops and caption choice (>= 0).
      process_index, process_count: this process reads shards ``i`` with ``i % process_count ==
        process_index``; fewer shards than processes is an error.
      shuffle_buffer: samples per shuffle block (raw encoded bytes are held: ~50 KB each for
        DataComp JPEGs). cycle_length: shards read at once, round-robin.
      area_min, area_max: inception-crop area range in percent (CLIPA: 40, 100).
      shuffle: False reads shards in listed order without permuting (debugging).
      num_threads: decode threads (PIL releases the GIL); default ``min(8, cpu count)``.
      prefetch: batches decoded ahead in a background thread (0: decode in ``next``).
      fast_decode: JPEG draft-mode decoding (see ``crops.decode_inception_crop``).
      with_keys: also return ``'key'``, the ``shard:key`` of every row.
    """
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    return TrainIterator(
        expand_pattern(pattern), batch_size=batch_size, image_size=image_size, tokenizer=tokenizer, seed=seed,
        process_index=process_index, process_count=process_count, shuffle_buffer=shuffle_buffer,
        cycle_length=cycle_length, area_min=area_min, area_max=area_max, shuffle=shuffle,
        num_threads=num_threads, prefetch=prefetch, fast_decode=fast_decode, with_keys=with_keys)
