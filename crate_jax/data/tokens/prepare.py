"""Tokenise plain-text, JSONL or Parquet files into token shards with a manifest and a held-out split.

    python -m crate_jax.data.tokens.prepare --input 'owt/*.parquet' --tokenizer gpt2/ --output data/owt
    python -m crate_jax.data.tokens.prepare --input corpus.jsonl --train-tokenizer 8192 --output data/mine

Inputs (`--input`: files, directories, glob patterns; `.gz` / `.xz` / `.bz2` compressed text and JSONL
too): a `.txt` file is one document; a `.jsonl` file holds one JSON object per line with the text
under `--text-key` (default `text`); a `.parquet` file (the Hugging Face `openwebtext` layout) holds
one document per row of that column. Every document is followed by the end-of-text token, as in
nanoGPT's OpenWebText preparation.

Tokenizer: `--tokenizer` a GPT-2 `vocab.json` + `merges.txt` directory or a `tokenizer.json`
(`crate_jax.text.bpe`), or `--train-tokenizer N` to train a byte-level BPE of N entries on the
**train** documents only (offline). It is copied to `DIR/tokenizer.json`.

Held-out split: each document goes to `val` with probability `--val-fraction` (a hash of the seed
and its index, so the split does not depend on the input's size or on the machine), else `train`.

Output (written to a temporary sibling and swapped into place: a failure or a kill leaves the old output
or nothing; `--overwrite` replaces an existing one, `--keep-old` keeps it as `DIR.old-STAMP`):

    DIR/manifest.json        {"format", "dtype", "vocab_size", "eot_id", "tokenizer", "splits": {
                               "train": {"tokens", "documents", "shards": [{"file", "tokens"}, ...]}, "val": ...},
                              "inputs", "val_fraction", "seed", "text_key"}
    DIR/train_00000.npy ...  1-D token arrays, uint16 when the vocabulary fits (<= 65,536 ids), else uint32
    DIR/val_00000.npy ...
    DIR/tokenizer.json

Bad input stops with an error naming the file: an empty file, text that is not UTF-8 (with the byte
offset), a JSONL line that is not JSON or lacks the text key, a Parquet file without the column.
`crate_jax.data.tokens.loader` reads the result.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from crate_jax import errors
from crate_jax.checkpoint.outputs import atomic_output_dir, check_destination, check_output
from crate_jax.text.bpe import BPETokenizer, TokenizerError, train_bpe

FORMAT = "crate_jax.text_tokens/1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens = 256 MiB of uint16 per shard
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}


class PrepareError(ValueError):
    """Input that cannot be tokenised; the message names the file (and line or byte) and what was expected."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_kind(path: Path) -> tuple[str, str | None]:
    """`('text' | 'jsonl' | 'parquet', compression suffix or None)` from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _OPENERS else None
    base = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if base not in _KINDS:
        raise PrepareError(f"{path}: unknown input type {''.join(path.suffixes)!r}; expected .txt, .jsonl or "
                           f".parquet (text and JSONL may be compressed: .gz, .xz, .bz2)")
    if _KINDS[base] == "parquet" and comp:
        raise PrepareError(f"{path}: compressed Parquet files are not supported (Parquet compresses internally)")
    return _KINDS[base], comp


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files from paths, directories (every supported file below them, sorted) and glob patterns."""
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if any(c in pat for c in "*?[") else [pat]
        if not matches:
            raise PrepareError(f"--input {pat}: no file matches this pattern")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = sorted(q for q in p.rglob("*") if q.is_file() and _supported(q))
                if not found:
                    raise PrepareError(f"--input {p}: the directory holds no .txt, .jsonl or .parquet files")
                out += found
            elif p.is_file():
                out.append(p)
            else:
                raise PrepareError(f"--input {p}: no such file or directory")
    return out


def _supported(p: Path) -> bool:
    try:
        file_kind(p)
        return True
    except PrepareError:
        return False


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: not valid UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                           f"convert the file to UTF-8 first") from None


def iter_documents(path: Path, *, text_key: str = "text") -> Iterator[str]:
    """The documents of one input file (see the module docstring); errors name the file."""
    kind, comp = file_kind(path)
    if path.stat().st_size == 0:
        raise PrepareError(f"{path}: empty file (0 bytes); remove it from --input")
    if kind == "parquet":
        yield from _parquet_documents(path, text_key)
        return
    opener = _OPENERS.get(comp, open)
    try:
        with opener(path, "rb") as f:
            if kind == "text":
                text = _decode(f.read(), str(path))
                if not text.strip():
                    raise PrepareError(f"{path}: the file holds no text (only whitespace)")
                yield text
                return
            n = 0
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(_decode(raw, where))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{where}: not a JSON object ({e.msg}); a .jsonl file holds one JSON object "
                                       f"per line") from None
                if not isinstance(row, dict) or text_key not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise PrepareError(f"{where}: no {text_key!r} field (it has {keys}); pass --text-key")
                text = row[text_key]
                if not isinstance(text, str):
                    raise PrepareError(f"{where}: field {text_key!r} is a {type(text).__name__}, expected a string")
                if text.strip():
                    n += 1
                    yield text
            if n == 0:
                raise PrepareError(f"{path}: no non-empty {text_key!r} documents in this JSONL file")
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise PrepareError(f"{path}: cannot be read ({type(e).__name__}: {e}); a truncated or damaged file?") from e


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with tensorflow-datasets
        raise PrepareError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
        raise PrepareError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    names = pf.schema_arrow.names
    if text_key not in names:
        raise PrepareError(f"{path}: no column {text_key!r} (columns: {names}); pass --text-key")
    n = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for i, value in enumerate(batch.column(0).to_pylist()):
            if isinstance(value, bytes):
                value = _decode(value, f"{path} row {n + i}")
            if isinstance(value, str) and value.strip():
                n += 1
                yield value
    if n == 0:
        raise PrepareError(f"{path}: column {text_key!r} holds no non-empty documents")


def split_of(index: int, seed: int, val_fraction: float) -> str:
    """'val' for a `val_fraction` share of documents, chosen by a hash of `(seed, index)`."""
    if val_fraction <= 0:
        return "train"
    h = zlib.crc32(f"{seed}:{index}".encode()) / 2 ** 32
    return "val" if h < val_fraction else "train"


class _ShardWriter:
    """Appends token arrays of one split; writes `{split}_{k:05d}.npy` shards of exactly `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids)
        self.buffered += ids.size
        self.tokens += ids.size
        self.documents += 1
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        head, rest = data[:n], data[n:]
        name = f"{self.split}_{len(self.shards):05d}.npy"
        np.save(self.dir / name, np.ascontiguousarray(head, self.dtype))
        self.shards.append({"file": name, "tokens": int(head.size)})
        self.buf = [rest] if rest.size else []
        self.buffered = int(rest.size)

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return {"tokens": int(self.tokens), "documents": int(self.documents), "shards": self.shards}


def prepare(inputs: Sequence[str], output: str | os.PathLike, *, tokenizer: str | None = None,
            train_tokenizer: int = 0, val_fraction: float = 0.0005, seed: int = 2357, text_key: str = "text",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_docs: int = 256, overwrite: bool = False,
            keep_old: bool = False, log=None) -> dict:
    """Tokenises `inputs` into `output` (see the module docstring) and returns the manifest.

    nanoGPT's OpenWebText split holds out 0.05 % of documents with seed 2357 (the defaults here)."""
    log = log or (lambda msg: print(f"[text_prepare] {msg}", file=sys.stderr, flush=True))
    out = Path(output)
    if (tokenizer is None) == (not train_tokenizer):
        raise PrepareError("pass exactly one of --tokenizer PATH (vocab.json + merges.txt, or tokenizer.json) and "
                           "--train-tokenizer N")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    check_destination(out, directory=True, overwrite=overwrite)
    files = expand_inputs(inputs)
    given = [p for p in inputs if not any(c in p for c in "*?[")]  # folders named as inputs count whole
    check_output(out, given + files + ([tokenizer] if tokenizer else []))

    def documents():
        index = 0
        for f in files:
            for text in iter_documents(f, text_key=text_key):
                yield index, split_of(index, seed, val_fraction), text
                index += 1

    t0 = time.perf_counter()
    try:
        if train_tokenizer:
            tok = train_bpe((text for _, split, text in documents() if split == "train"), int(train_tokenizer))
            log(f"trained a byte-level BPE of {tok.vocab_size} entries on the train documents "
                f"({time.perf_counter() - t0:.1f} s)")
        else:
            tok = BPETokenizer.load(tokenizer)
    except TokenizerError as e:
        raise PrepareError(str(e)) from e
    dtype = token_dtype(tok.vocab_size)
    with atomic_output_dir(out, overwrite=overwrite, keep_old=keep_old) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, int(shard_tokens)) for s in SPLITS}
        pending: list[tuple[str, str]] = []

        def flush():
            for (split, _), ids in zip(pending, tok.encode_batch([t for _, t in pending])):
                writers[split].add(np.asarray(ids + [tok.eot_id], dtype))
            pending.clear()

        n_docs = 0
        for _, split, text in documents():
            pending.append((split, text))
            n_docs += 1
            if len(pending) >= batch_docs:
                flush()
        flush()
        splits = {s: w.close() for s, w in writers.items()}
        if n_docs == 0:
            raise PrepareError(f"--input {list(inputs)}: no documents found")
        if val_fraction > 0 and splits["val"]["documents"] == 0:
            raise PrepareError(f"none of the {n_docs} documents fell into the held-out split (--val-fraction "
                               f"{val_fraction}); raise --val-fraction, or split the text into more documents "
                               f"(several files or JSONL rows)")
        if splits["train"]["documents"] == 0:
            raise PrepareError(f"all {n_docs} documents fell into the held-out split; lower --val-fraction")
        tok.save(tmp / TOKENIZER_FILE)
        manifest = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                    "tokenizer": TOKENIZER_FILE, "tokenizer_source": tok.source, "splits": splits,
                    "inputs": [str(f) for f in files], "val_fraction": val_fraction, "seed": seed,
                    "text_key": text_key}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"{n_docs} documents -> train {splits['train']['tokens']:,} tokens ({splits['train']['documents']} documents, "
        f"{len(splits['train']['shards'])} shards), val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']} documents); {dtype.name}; {time.perf_counter() - t0:.1f} s -> {out}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.data.tokens.prepare", __doc__)
    ap.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    ap.add_argument("--output", required=True, help="a new directory")
    ap.add_argument("--tokenizer", help="GPT-2 vocab.json + merges.txt directory, or a tokenizer.json")
    ap.add_argument("--train-tokenizer", type=int, default=0, metavar="N",
                    help="train a byte-level BPE of N entries on the train documents instead")
    ap.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents held out (nanoGPT: 0.0005)")
    ap.add_argument("--seed", type=int, default=2357, help="seed of the held-out split (nanoGPT: 2357)")
    ap.add_argument("--text-key", default="text", help="JSONL field / Parquet column holding the text")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output directory (swapped in only once the new one is complete)")
    ap.add_argument("--keep-old", action="store_true",
                    help="with --overwrite: keep the replaced directory beside the new one as NAME.old-STAMP")
    a = ap.parse_args(argv)
    try:
        if a.keep_old and not a.overwrite:
            raise errors.UsageError("--keep-old keeps the output that --overwrite replaces; pass both")
        prepare(a.input, a.output, tokenizer=a.tokenizer, train_tokenizer=a.train_tokenizer,
                val_fraction=a.val_fraction, seed=a.seed, text_key=a.text_key, shard_tokens=a.shard_tokens,
                overwrite=a.overwrite, keep_old=a.keep_old)
    except (PrepareError, errors.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
