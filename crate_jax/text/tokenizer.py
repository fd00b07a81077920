"""BERT-uncased WordPiece tokenisation as CLIPA uses it (docs/clipa.md §Recipes).

CLIPA's ``bert_tokenize`` op runs tensorflow_text's ``BertTokenizer(lower_case=True)`` on the caption,
keeps the first ``L - 1`` word pieces, prepends ``[CLS]`` (id 101 in the BERT vocab) and pads with 0 to
``L``. There is no ``[SEP]``. Here the same pipeline is built from the HF ``tokenizers`` library:

* normalisation: case folding (tensorflow_text's ``lower_case`` is ICU NFKC_Casefold, so "Straße" ->
  "strasse"), NFKC, then BERT's normaliser (control characters removed, CJK characters spaced out,
  lower-casing, NFD + accent stripping: "Café Déjà vu" -> "cafe deja vu");
* BERT pre-tokenisation: split on whitespace and on every punctuation character;
* WordPiece with ``[UNK]`` for words that cannot be covered, at most 100 characters per word.

The vocab is a BERT ``vocab.txt``: one token per line, the id is the 0-based line number.
:func:`build_vocab` writes such a file from captions (deterministically: characters, then whole words
by count), with the BERT id layout for the special tokens; from a caption file (one per line), also on
the command line:

    python -m crate_jax.text.tokenizer --corpus captions.txt --out vocab.txt [--size 32000]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

PAD_ID = 0
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
# BERT's vocab.txt layout: 0 [PAD], 1..99 [unused0..98], 100 [UNK], 101 [CLS], 102 [SEP], 103 [MASK].
BERT_SPECIAL_TOKENS = (
    ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
)
MAX_CHARS_PER_WORD = 100
DEFAULT_VOCAB_SIZE = 32_000  # configs/clipa.py's text vocab_size


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
            ),
        ]
    )


def _as_str(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"captions must be str or bytes, got {type(text).__name__}: {text!r}")
    # str.casefold is Unicode full case folding, as in ICU's NFKC_Casefold used by tensorflow_text.
    return text.casefold()


def read_vocab(vocab_path: str | os.PathLike) -> dict[str, int]:
    """Reads a BERT ``vocab.txt`` (token per line, id = line number) into ``{token: id}``."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            token = line.rstrip("\r\n")
            if not token:
                raise ValueError(f"{vocab_path}: line {i + 1} is empty; expected one token per line")
            if token in vocab:
                raise ValueError(
                    f"{vocab_path}: token {token!r} appears on lines {vocab[token] + 1} and {i + 1}; "
                    "a BERT vocab.txt must not repeat tokens"
                )
            vocab[token] = i
    if not vocab:
        raise ValueError(f"{vocab_path}: vocab file is empty")
    return vocab


class Tokenizer:
    """CLIPA text tokeniser: ``tok(captions) -> int32 [B, L]``.

    Row layout: ``[CLS] p_1 ... p_k 0 ... 0`` with ``k <= L - 1`` word pieces, no ``[SEP]``.

    Args:
      vocab_path: BERT-layout ``vocab.txt`` (must contain ``[UNK]`` and ``[CLS]``).
      max_len: ``L``, the full row length including ``[CLS]`` (CLIPA: 32).
    """

    def __init__(self, vocab_path: str | os.PathLike, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (room for [CLS]), got {max_len}")
        vocab = read_vocab(vocab_path)
        for token in (UNK_TOKEN, CLS_TOKEN):
            if token not in vocab:
                raise ValueError(f"{vocab_path}: vocab has no {token} token; expected a BERT vocab.txt")
        self.vocab_path = os.fspath(vocab_path)
        self.max_len = int(max_len)
        self.vocab_size = len(vocab)
        self.cls_id = vocab[CLS_TOKEN]
        self.unk_id = vocab[UNK_TOKEN]
        hf = _HFTokenizer(
            models.WordPiece(
                vocab, unk_token=UNK_TOKEN, max_input_chars_per_word=MAX_CHARS_PER_WORD
            )
        )
        hf.normalizer = _normalizer()
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._hf = hf

    def pieces(self, text: str | bytes) -> list[str]:
        """The word pieces of one caption, before truncation (for inspection and tests)."""
        return self._hf.encode(_as_str(text), add_special_tokens=False).tokens

    def __call__(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Tokenises captions to ``int32 [B, L]``: ``[CLS]``, up to ``L-1`` pieces, zero padding."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("Tokenizer expects a list of captions, got a single string")
        out = np.full((len(texts), self.max_len), PAD_ID, np.int32)
        out[:, 0] = self.cls_id
        if not len(texts):
            return out
        encodings = self._hf.encode_batch([_as_str(t) for t in texts], add_special_tokens=False)
        keep = self.max_len - 1
        for row, enc in zip(out, encodings):
            ids = enc.ids[:keep]
            row[1 : 1 + len(ids)] = ids
        return out


def build_vocab(
    captions: Iterable[str], out_path: str | os.PathLike, vocab_size: int, min_frequency: int = 1
) -> int:
    """Builds a vocab from ``captions`` and writes it in BERT's ``vocab.txt`` layout, deterministically.

    Ids: 0 ``[PAD]``, 1..99 ``[unused0..98]``, 100 ``[UNK]``, 101 ``[CLS]``, 102 ``[SEP]``,
    103 ``[MASK]``; then every character that starts a word and every ``##``-continuation character
    (so any word made of seen characters can be spelled), then whole words by decreasing count (ties in
    alphabetical order) while they fit in ``vocab_size`` and occur at least ``min_frequency`` times. The
    normalisation and pre-tokenisation are those of :class:`Tokenizer`, so the pieces match what it will
    look up. Returns the number of entries written (fewer than ``vocab_size`` on a small corpus).

    This is not the WordPiece merge trainer: HF's trainer returns a different vocab on every run for
    the same corpus (its merges break frequency ties in hash order), which made the demos'
    scores unreproducible. Whole words plus characters is what a greedy longest-match WordPiece
    tokenizer needs, and is the same on every run.
    """
    if vocab_size <= len(BERT_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed the {len(BERT_SPECIAL_TOKENS)} BERT special entries, got {vocab_size}"
        )
    import collections
    norm, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter = collections.Counter()
    for caption in captions:
        text = norm.normalize_str(_as_str(caption))
        counts.update(w for w, _ in pre.pre_tokenize_str(text) if len(w) <= MAX_CHARS_PER_WORD)
    firsts = sorted({w[0] for w in counts})
    conts = sorted({"##" + c for w in counts for c in w[1:]})
    tokens = list(BERT_SPECIAL_TOKENS) + firsts + conts
    have = set(tokens)
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size or n < min_frequency:
            break
        if word not in have:
            tokens.append(word)
            have.add(word)
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(tokens) - len(BERT_SPECIAL_TOKENS)} "
                         f"characters of this corpus plus the {len(BERT_SPECIAL_TOKENS)} BERT special entries")
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens)


def build_vocab_file(corpus: str | os.PathLike, out_path: str | os.PathLike,
                     vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """:func:`build_vocab` on a UTF-8 text file holding one caption per line (blank lines ignored)."""
    corpus = os.fspath(corpus)
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"caption corpus {corpus} not found; expected a UTF-8 text file, one caption per line")
    with open(corpus, encoding="utf-8") as f:
        return build_vocab((line.rstrip("\r\n") for line in f if line.strip()), out_path, vocab_size)


def main(argv: Sequence[str] | None = None) -> None:
    from crate_jax.cli import tool_parser
    p = tool_parser("crate_jax.text.tokenizer", "Writes a BERT-layout WordPiece vocab.txt from a caption file.")
    p.add_argument("--corpus", required=True, help="UTF-8 text file, one caption per line")
    p.add_argument("--out", required=True, help="vocab.txt to write")
    p.add_argument("--size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="vocab size including the 104 BERT special entries (a small corpus may give fewer)")
    a = p.parse_args(argv)
    n = build_vocab_file(a.corpus, a.out, a.size)
    print(f"wrote {n} tokens to {a.out}")


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
