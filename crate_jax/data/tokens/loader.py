"""Reading the token shards of `crate_jax.data.tokens.prepare`: random train windows, ordered eval windows.

Train (`make_train_iterator`): the train split's tokens, concatenated in shard order, are cut into one
contiguous range per process, `[N·p/P, N·(p+1)/P)`; process `p` draws windows of `block + 1` tokens
(inputs and next-token targets) at uniformly random starts inside its own range only, so the
processes never read each other's tokens. The stream is a grain `MapDataset` (an endless index,
`random_map` with a per-element rng from the seed, the process and the index, `batch`), read by a
grain iterator; `get_state()` / `set_state()` resume it exactly.

Eval (`eval_windows`): windows of `block + 1` tokens with stride `block` over a split, so every token
after the first is a target exactly once; process `p` reads its contiguous block of windows, padded
to the same number of fixed-size batches on every process, with `mask` marking real rows.

Every shard is checked against the manifest when the dataset is opened: its `.npy` header dtype,
its length, and its existence; a mismatch is an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from crate_jax.data.tokens.prepare import FORMAT, MANIFEST, SPLITS


class TokenDataError(ValueError):
    """A prepared token directory that cannot be used; the message names the file and what was expected."""


class TokenSplit:
    """One split's shards as one virtual 1-D array: `len(split)` tokens, `split.read(start, n)`."""

    def __init__(self, directory: Path, name: str, info: Mapping, dtype: np.dtype):
        self.name = name
        self.arrays: list[np.ndarray] = []
        for shard in info.get("shards", []):
            path = directory / shard["file"]
            self.arrays.append(_open_shard(path, dtype, int(shard["tokens"])))
        lengths = [a.shape[0] for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.documents = int(info.get("documents", 0))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens `[start, start + n)` as int32 (across shard boundaries)."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"{self.name}: tokens [{start}, {start + n}) outside [0, {len(self)})")
        out, pos, k = [], start, int(np.searchsorted(self.offsets, start, side="right") - 1)
        while n > 0:
            local = pos - int(self.offsets[k])
            take = min(n, self.arrays[k].shape[0] - local)
            out.append(self.arrays[k][local:local + take])
            pos, n, k = pos + take, n - take, k + 1
        return np.concatenate(out).astype(np.int32) if len(out) > 1 else out[0].astype(np.int32)


def _open_shard(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    if not path.is_file():
        raise TokenDataError(f"{path}: shard listed in the manifest is missing")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only; data is paged in on use
    except (ValueError, OSError) as e:
        raise TokenDataError(f"{path}: not a readable .npy shard ({e})") from e
    if array.dtype != dtype:
        raise TokenDataError(f"{path}: shard dtype {array.dtype.name} does not match the manifest's {dtype.name}; "
                             f"the directory mixes shards of different preparations (re-run text_prepare)")
    if array.shape != (tokens,):
        raise TokenDataError(f"{path}: shard shape {array.shape}, the manifest says {tokens} tokens (1-D); the file "
                             f"was changed or truncated after preparation")
    return array


class TokenDataset:
    """A prepared directory: `manifest`, `vocab_size`, `eot_id`, `tokenizer_path`, `split(name)`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise TokenDataError(f"{self.dir}: no {MANIFEST}; expected a directory written by "
                                 f"`python -m crate_jax.data.tokens.prepare`")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TokenDataError(f"{path}: not valid JSON ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise TokenDataError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        try:
            self.dtype = np.dtype(self.manifest["dtype"])
        except TypeError as e:
            raise TokenDataError(f"{path}: unknown dtype {self.manifest.get('dtype')!r}") from e
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eot_id = int(self.manifest["eot_id"])
        self.tokenizer_path = self.dir / self.manifest.get("tokenizer", "tokenizer.json")
        self._splits: dict[str, TokenSplit] = {}

    def split(self, name: str) -> TokenSplit:
        if name not in self.manifest.get("splits", {}):
            raise TokenDataError(f"{self.dir}: no split {name!r}; the manifest has {sorted(self.manifest['splits'])}")
        if name not in self._splits:
            self._splits[name] = TokenSplit(self.dir, name, self.manifest["splits"][name], self.dtype)
        return self._splits[name]

    def fingerprint(self) -> dict:
        s = self.manifest["splits"]
        return {"vocab_size": self.vocab_size, **{f"{k}_tokens": int(s[k]["tokens"]) for k in SPLITS if k in s}}


def process_range(n_tokens: int, process_index: int, process_count: int) -> tuple[int, int]:
    """`[start, stop)` of the contiguous token range of `process_index` among `process_count`."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    return n_tokens * process_index // process_count, n_tokens * (process_index + 1) // process_count


class _Window:
    """`index, rng -> {'tokens': int32 [block + 1]}` at a uniformly random start in `[lo, hi - block - 1]`."""

    def __init__(self, split: TokenSplit, lo: int, hi: int, block: int):
        self.split, self.lo, self.block = split, lo, block
        self.starts = hi - lo - block  # number of valid starts (>= 1, checked by the caller)

    def __call__(self, index, rng: np.random.Generator) -> dict:
        start = self.lo + int(rng.integers(0, self.starts))
        return {"tokens": self.split.read(start, self.block + 1)}


class LMTrainIterator:
    """This process's endless batches `{'tokens': int32 [batch, block + 1]}` (`crate_jax.train.task.DataIterator`)."""

    def __init__(self, dataset: TokenDataset, *, block: int, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, split: str = "train", num_threads: int = 2, prefetch: int = 4):
        if batch_size < 1 or block < 1:
            raise ValueError(f"batch_size and block must be >= 1, got {batch_size}, {block}")
        tokens = dataset.split(split)
        lo, hi = process_range(len(tokens), process_index, process_count)
        if hi - lo < block + 1:
            raise TokenDataError(f"{dataset.dir}: the {split} split has {len(tokens):,} tokens, {hi - lo:,} for "
                                 f"process {process_index} of {process_count}: fewer than one window of block + 1 = "
                                 f"{block + 1}")
        self.range = (lo, hi)
        self.block, self.batch_size = block, batch_size
        self._window = _Window(tokens, lo, hi, block)
        elem_seed = int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])
        self.windows_per_epoch = max(1, (hi - lo) // (block + 1))
        ds = (grain.MapDataset.range(self.windows_per_epoch).repeat(None)
              .random_map(self._window, seed=elem_seed).batch(batch_size, drop_remainder=True))
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                             prefetch_buffer_size=prefetch)))
        self._fingerprint = {**dataset.fingerprint(), "split": split, "block": block, "batch_size": batch_size,
                             "seed": int(seed), "process_index": int(process_index),
                             "process_count": int(process_count)}
        self._batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._batches += 1
        return {"tokens": np.asarray(batch["tokens"], np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"reader": self._it.get_state(), "batches": self._batches, "fingerprint": dict(self._fingerprint)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self._fingerprint:
            diff = {k: (saved.get(k), self._fingerprint.get(k)) for k in sorted(set(saved) | set(self._fingerprint))
                    if saved.get(k) != self._fingerprint.get(k)}
            raise ValueError(f"token-iterator state was saved for a different stream; differing fields (saved, now): "
                             f"{diff}. Resume with the same data directory, block, batch, seed and process layout.")
        self._it.set_state(state["reader"])
        self._batches = int(state["batches"])

    def stats(self) -> dict[str, float]:
        return {"batches": self._batches,
                "epoch": self._batches * self.batch_size / self.windows_per_epoch}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_train_iterator(data_dir: str | os.PathLike, *, block: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, num_threads: int = 2) -> LMTrainIterator:
    return LMTrainIterator(TokenDataset(data_dir), block=block, batch_size=batch_size, seed=seed,
                           process_index=process_index, process_count=process_count, num_threads=num_threads)


def eval_windows(dataset: TokenDataset, split: str, *, block: int, max_windows: int | None = None) -> int:
    """How many stride-`block` windows of `block + 1` tokens the split holds (capped at `max_windows`)."""
    n = max(0, (len(dataset.split(split)) - 1) // block)
    return min(n, max_windows) if max_windows else n


def eval_batches(dataset: TokenDataset, split: str, *, block: int, batch_size: int, max_windows: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass: `{'tokens': int32 [batch, block + 1], 'mask': bool [batch]}`; this process's block of
    windows, padded so every process yields `ceil(ceil(W / P) / batch)` batches."""
    tokens = dataset.split(split)
    total = eval_windows(dataset, split, block=block, max_windows=max_windows)
    if total == 0:
        raise TokenDataError(f"{dataset.dir}: the {split} split has {len(tokens)} tokens, fewer than one eval window "
                             f"of block + 1 = {block + 1}")
    lo, hi = process_range(total, process_index, process_count)
    n_batches = max(1, math.ceil(math.ceil(total / process_count) / batch_size))
    w = lo
    for _ in range(n_batches):
        rows = np.zeros((batch_size, block + 1), np.int32)
        mask = np.zeros((batch_size,), bool)
        for r in range(batch_size):
            if w >= hi:
                break
            rows[r] = tokens.read(w * block, block + 1)
            mask[r] = True
            w += 1
        yield {"tokens": rows, "mask": mask}
