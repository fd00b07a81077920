"""Masked-LM batches from the token shards of `crate_jax.data.tokens.prepare`: packed rows, dynamic masking.

Rows (RoBERTa's FULL-SENTENCES packing): `<s>` + `T − 2` consecutive tokens of the split + `</s>`, documents
packed across rows, each document's end-of-text token written as `</s>` (the separator). Train rows start
at uniformly random offsets inside this process's contiguous token range (as the causal LM's windows,
`crate_jax.data.tokens.loader`); eval rows are the ordered, non-overlapping windows of the split.

Dynamic masking (BERT / RoBERTa): each non-special position is chosen with probability `prob` (15 %); a
chosen token becomes `<mask>` with probability `mask_frac` (80 %), a uniformly random ordinary token with
probability `random_frac` (10 %), and stays itself otherwise; `labels` holds the original id at chosen
positions and −100 elsewhere. Special tokens (`<s>`, `</s>`, `<pad>`, `<mask>`, `<unk>`, end-of-text) are
never chosen. Train masks are drawn afresh per example from a per-element rng (grain's `random_map`: the
seed, the process and the example index), so `get_state()` / `set_state()` resume exactly; eval masks are
fixed by the window index, so every evaluation scores the same positions.

Special ids (`MLMVocab`): a tokenizer that has RoBERTa's `<s> <pad> </s> <mask>` (a `vocab.json` +
`merges.txt` of `roberta-base`) keeps its ids; one without them (a BPE trained offline by `text_prepare`)
gets them in front: `<s>` 0, `<pad>` 1, `</s>` 2, `<mask>` 3, every token id shifted by 4.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from crate_jax.data.tokens.loader import TokenDataError, TokenDataset, process_range

IGNORE = -100
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<mask>")


@dataclasses.dataclass(frozen=True)
class Masking:
    prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1

    def __post_init__(self):
        if not (0 < self.prob < 1 and 0 <= self.mask_frac and 0 <= self.random_frac
                and self.mask_frac + self.random_frac <= 1):
            raise ValueError(f"masking needs 0 < prob < 1 and mask_frac + random_frac <= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class MLMVocab:
    """The model's vocabulary over a prepared token directory: special ids and the shift of the data's ids."""

    size: int
    bos: int
    pad: int
    eos: int
    mask: int
    offset: int  # model id = data id + offset
    eot: int  # the data's end-of-text id, in model ids (written as `</s>`)
    specials: tuple[int, ...]

    @classmethod
    def of(cls, dataset: TokenDataset) -> "MLMVocab":
        ids = _special_ids(dataset)
        if all(ids.get(t) is not None for t in ROBERTA_SPECIALS):
            bos, pad, eos, mask = (ids[t] for t in ROBERTA_SPECIALS)
            extra = tuple(i for i in (ids.get("<unk>"),) if i is not None)
            return cls(dataset.vocab_size, bos, pad, eos, mask, 0, dataset.eot_id,
                       tuple(sorted({bos, pad, eos, mask, dataset.eot_id, *extra})))
        off = len(ROBERTA_SPECIALS)
        return cls(dataset.vocab_size + off, 0, 1, 2, 3, off, dataset.eot_id + off, (0, 1, 2, 3, dataset.eot_id + off))

    def ordinary(self) -> np.ndarray:
        """The ids a random replacement draws from (every id but the specials)."""
        keep = np.ones(self.size, bool)
        keep[list(self.specials)] = False
        keep[: self.offset] = False
        return np.flatnonzero(keep).astype(np.int32)


def _special_ids(dataset: TokenDataset) -> dict[str, int | None]:
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(dataset.tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise TokenDataError(f"{dataset.tokenizer_path}: cannot read the tokenizer ({e})") from e
    return {t: tok.token_to_id(t) for t in ROBERTA_SPECIALS + ("<unk>",)}


def pack_row(vocab: MLMVocab, body: np.ndarray) -> np.ndarray:
    """`<s>` + body (data ids shifted, end-of-text as `</s>`) + `</s>`, int32."""
    body = body.astype(np.int32) + vocab.offset
    body = np.where(body == vocab.eot, vocab.eos, body)
    return np.concatenate([[vocab.bos], body, [vocab.eos]]).astype(np.int32)


def mask_row(row: np.ndarray, vocab: MLMVocab, masking: Masking, pool: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs, labels)`: the 15 % / 80-10-10 dynamic masking of one packed row (module docstring)."""
    chosen = (rng.random(row.shape) < masking.prob) & ~np.isin(row, vocab.specials)
    u = rng.random(row.shape)
    replace = pool[rng.integers(0, len(pool), row.shape)]
    inputs = np.where(chosen & (u < masking.mask_frac), vocab.mask, row)
    inputs = np.where(chosen & (u >= masking.mask_frac) & (u < masking.mask_frac + masking.random_frac), replace, inputs)
    return inputs.astype(np.int32), np.where(chosen, row, IGNORE).astype(np.int32)


class _Example:
    """`index, rng -> {'tokens', 'labels'}`: a packed row at a random start in `[lo, hi − (T − 2)]`, masked."""

    def __init__(self, split, lo, hi, seq_len, vocab, masking):
        self.split, self.lo, self.body = split, lo, seq_len - 2
        self.starts = hi - lo - self.body + 1
        self.vocab, self.masking, self.pool = vocab, masking, vocab.ordinary()

    def __call__(self, index, rng: np.random.Generator) -> dict:
        start = self.lo + int(rng.integers(0, self.starts))
        row = pack_row(self.vocab, self.split.read(start, self.body))
        tokens, labels = mask_row(row, self.vocab, self.masking, self.pool, rng)
        return {"tokens": tokens, "labels": labels}


class MLMTrainIterator:
    """This process's endless batches `{'tokens', 'labels': int32 [batch, T]}` (a `DataIterator`)."""

    def __init__(self, dataset: TokenDataset, vocab: MLMVocab, *, seq_len: int, batch_size: int, seed: int,
                 masking: Masking = Masking(), process_index: int = 0, process_count: int = 1, split: str = "train",
                 num_threads: int = 2, prefetch: int = 4):
        if batch_size < 1 or seq_len < 3:
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 3, got {batch_size}, {seq_len}")
        tokens = dataset.split(split)
        lo, hi = process_range(len(tokens), process_index, process_count)
        if hi - lo < seq_len - 2:
            raise TokenDataError(f"{dataset.dir}: the {split} split has {len(tokens):,} tokens, {hi - lo:,} for process "
                                 f"{process_index} of {process_count}: fewer than one row of seq_len - 2 = {seq_len - 2}")
        self.batch_size = batch_size
        elem_seed = int(np.random.SeedSequence([int(seed), int(process_index), 0x6D6C6D]).generate_state(1)[0])
        self.rows_per_epoch = max(1, (hi - lo) // (seq_len - 2))
        example = _Example(tokens, lo, hi, seq_len, vocab, masking)
        ds = (grain.MapDataset.range(self.rows_per_epoch).repeat(None)
              .random_map(example, seed=elem_seed).batch(batch_size, drop_remainder=True))
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
        self._fingerprint = {**dataset.fingerprint(), "split": split, "seq_len": seq_len, "batch_size": batch_size,
                             "seed": int(seed), "masking": dataclasses.asdict(masking),
                             "process_index": int(process_index), "process_count": int(process_count)}
        self._batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._batches += 1
        return {"tokens": np.asarray(batch["tokens"], np.int32), "labels": np.asarray(batch["labels"], np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"reader": self._it.get_state(), "batches": self._batches, "fingerprint": dict(self._fingerprint)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self._fingerprint:
            diff = {k: (saved.get(k), self._fingerprint.get(k)) for k in sorted(set(saved) | set(self._fingerprint))
                    if saved.get(k) != self._fingerprint.get(k)}
            raise ValueError(f"MLM-iterator state was saved for a different stream; differing fields (saved, now): "
                             f"{diff}. Resume with the same data directory, seq_len, batch, seed and process layout.")
        self._it.set_state(state["reader"])
        self._batches = int(state["batches"])

    def stats(self) -> dict[str, float]:
        return {"batches": self._batches, "epoch": self._batches * self.batch_size / self.rows_per_epoch}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def eval_rows(dataset: TokenDataset, split: str, *, seq_len: int, max_rows: int | None = None) -> int:
    n = len(dataset.split(split)) // (seq_len - 2)
    return min(n, max_rows) if max_rows else n


def eval_batches(dataset: TokenDataset, vocab: MLMVocab, split: str, *, seq_len: int, batch_size: int,
                 masking: Masking = Masking(), max_rows: int | None = None, seed: int = 0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass: `{'tokens', 'labels': int32 [batch, T], 'mask': bool [batch]}` over this process's block
    of rows, padded so every process yields the same number of batches; row `w`'s mask is drawn from `(seed, w)`."""
    tokens = dataset.split(split)
    total, body = eval_rows(dataset, split, seq_len=seq_len, max_rows=max_rows), seq_len - 2
    if total == 0:
        raise TokenDataError(f"{dataset.dir}: the {split} split has {len(tokens)} tokens, fewer than one row of "
                             f"seq_len - 2 = {body}")
    pool = vocab.ordinary()
    lo, hi = process_range(total, process_index, process_count)
    w = lo
    for _ in range(max(1, math.ceil(math.ceil(total / process_count) / batch_size))):
        out = {"tokens": np.full((batch_size, seq_len), vocab.pad, np.int32),
               "labels": np.full((batch_size, seq_len), IGNORE, np.int32), "mask": np.zeros((batch_size,), bool)}
        for r in range(batch_size):
            if w >= hi:
                break
            row = pack_row(vocab, tokens.read(w * body, body))
            out["tokens"][r], out["labels"][r] = mask_row(row, vocab, masking, pool, np.random.default_rng([seed, w]))
            out["mask"][r] = True
            w += 1
        yield out
