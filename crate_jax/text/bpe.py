"""Byte-level BPE (GPT-2's tokenizer) through Hugging Face `tokenizers`, loaded from disk or trained offline.

    tok = BPETokenizer.load("gpt2/")              # a directory with vocab.json + merges.txt, or tokenizer.json
    tok = BPETokenizer.load("tokenizer.json")     # a `tokenizers` JSON file
    tok = train_bpe(texts, vocab_size=4096)       # a new BPE on local text
    ids = tok.encode("Hello world")               # list[int]; tok.decode(ids) == "Hello world"

Byte level: text is UTF-8 bytes mapped to 256 printable symbols, split by GPT-2's pre-tokenisation
regex (contractions, letters, digits, other, whitespace), then merged by the BPE ranks; every
string round-trips exactly and there is no unknown token. The end-of-text token `<|endoftext|>`
(id 50256 in GPT-2's vocab) separates documents; a trained tokenizer puts it at id 0.

Command line (train on local text files, one document per file):

    python -m crate_jax.text.bpe --input corpus/*.txt --vocab-size 4096 --output tokenizer.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or built; the message names the file and what was expected."""


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class BPETokenizer:
    """`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot_id` (the `<|endoftext|>` id)."""

    def __init__(self, hf: Tokenizer, source: str = "tokenizer"):
        self._hf = hf
        self.source = source
        eot = hf.token_to_id(EOT)
        if eot is None:
            hf.add_special_tokens([EOT])
            eot = hf.token_to_id(EOT)
        else:  # a vocab entry already (GPT-2: 50256): make it special so text never splits it
            hf.add_special_tokens([EOT])
        self.eot_id = int(eot)
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """From a `tokenizer.json`, or a GPT-2 `vocab.json` (with `merges.txt` beside it), or a directory
        holding either."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file():
                path = path / "vocab.json"
            else:
                raise TokenizerError(f"{path}: no tokenizer.json and no vocab.json + merges.txt in this directory")
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file (expected tokenizer.json, or vocab.json with "
                                 f"merges.txt beside it)")
        if path.name == "vocab.json" or (path.suffix == ".json" and (path.parent / "merges.txt").is_file()
                                         and _is_vocab_map(path)):
            merges = path.parent / "merges.txt"
            if not merges.is_file():
                raise TokenizerError(f"{path}: a GPT-2 vocab.json needs merges.txt in the same directory "
                                     f"({merges} is missing)")
            try:
                hf = _byte_level(Tokenizer(models.BPE.from_file(str(path), str(merges))))
            except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
                raise TokenizerError(f"{path} + {merges}: not a readable BPE vocab / merges pair: {e}") from e
            return cls(hf, str(path))
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"{path}: not a readable tokenizers JSON file: {e}") from e
        if not isinstance(hf.model, models.BPE):
            raise TokenizerError(f"{path}: a {type(hf.model).__name__} tokenizer, expected byte-level BPE")
        return cls(hf, str(path))

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the whole tokenizer as one `tokenizer.json` (a directory gets `tokenizer.json` inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(path))
        return path

    def save_vocab_merges(self, directory: str | os.PathLike) -> list[Path]:
        """GPT-2's on-disk form: `vocab.json` + `merges.txt`."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        return [Path(p) for p in self._hf.model.save(str(directory))]


def _is_vocab_map(path: Path) -> bool:
    """A `{token: id}` JSON object (GPT-2 vocab.json), as opposed to a `tokenizers` JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and "model" not in head


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> BPETokenizer:
    """A byte-level BPE trained on `texts` (offline): the 256 byte symbols, `<|endoftext|>` at id 0, then
    merges up to `vocab_size` entries (fewer if the corpus runs out of pairs seen `min_frequency` times)."""
    if vocab_size < 258:
        raise TokenizerError(f"vocab_size must be >= 258 (256 bytes + <|endoftext|> + one merge), got {vocab_size}")
    hf = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return BPETokenizer(hf, "trained")


def main(argv: Sequence[str] | None = None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.text.bpe", "Trains a byte-level BPE on local UTF-8 text files (one document each).")
    ap.add_argument("--input", nargs="+", required=True, help="text files to train the tokenizer on")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
    ap.add_argument("--output", required=True, help="tokenizer.json to write")
    a = ap.parse_args(argv)

    def texts():
        for p in a.input:
            yield Path(p).read_text(encoding="utf-8")
    tok = train_bpe(texts(), a.vocab_size)
    print(f"wrote {tok.vocab_size} tokens to {tok.save(a.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
