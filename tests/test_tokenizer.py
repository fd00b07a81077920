"""CLIPA BERT WordPiece tokeniser: exact ids against a hand-written BERT-layout vocab."""

import numpy as np
import pytest

from crate_jax.text import tokenizer as T
from crate_jax.text.tokenizer import BERT_SPECIAL_TOKENS, Tokenizer, build_vocab, read_vocab

# Hand-written vocab, ids 104.. after the 104 BERT special entries.
WORDS = ["a", "cafe", "deja", "vu", "red", "circle", "at", "the", "top", "left", ",", "!", ".",
         "-", "un", "##believ", "##able", "photo", "of", "strasse", "abc", "日"]
ID = {w: 104 + i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(BERT_SPECIAL_TOKENS + WORDS) + "\n", encoding="utf-8")
    return path


def _row(ids, length):
    return [101] + ids + [0] * (length - 1 - len(ids))


def test_special_ids_follow_bert_layout(vocab_path):
    vocab = read_vocab(vocab_path)
    assert (vocab["[PAD]"], vocab["[unused0]"], vocab["[unused98]"]) == (0, 1, 99)
    assert (vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]) == (100, 101, 102, 103)
    tok = Tokenizer(vocab_path, 8)
    assert tok.vocab_size == 104 + len(WORDS) and tok.cls_id == 101 and tok.unk_id == 100


def test_accents_case_and_unicode_folding(vocab_path):
    tok = Tokenizer(vocab_path, 8)
    out = tok(["Café Déjà vu", "CAFÉ", "Straße", "ＡＢＣ"])
    assert out.dtype == np.int32 and out.shape == (4, 8)
    assert out[0].tolist() == _row([ID["cafe"], ID["deja"], ID["vu"]], 8)
    assert out[1].tolist() == _row([ID["cafe"]], 8)
    assert out[2].tolist() == _row([ID["strasse"]], 8)  # case folding, as tensorflow_text does
    assert out[3].tolist() == _row([ID["abc"]], 8)  # NFKC: full-width letters


def test_punctuation_split_and_unknown(vocab_path):
    tok = Tokenizer(vocab_path, 12)
    out = tok(["red-circle, at the top!", "a zebra.", "日本"])
    assert out[0].tolist() == _row(
        [ID["red"], ID["-"], ID["circle"], ID[","], ID["at"], ID["the"], ID["top"], ID["!"]], 12
    )
    # A word that WordPiece cannot cover becomes one [UNK]; CJK characters are split one per token.
    assert out[1].tolist() == _row([ID["a"], 100, ID["."]], 12)
    assert out[2].tolist() == _row([ID["日"], 100], 12)


def test_wordpiece_continuations(vocab_path):
    tok = Tokenizer(vocab_path, 8)
    assert tok.pieces("Unbelievable") == ["un", "##believ", "##able"]
    assert tok(["unbelievable"])[0].tolist() == _row([ID["un"], ID["##believ"], ID["##able"]], 8)
    # Missing continuation: the whole word is [UNK], not a partial match.
    assert tok(["unbeliev"])[0].tolist() == _row([ID["un"], ID["##believ"]], 8)
    assert tok(["unbelieve"])[0].tolist() == _row([100], 8)


def test_truncation_keeps_l_minus_1_pieces_and_no_sep(vocab_path):
    tok = Tokenizer(vocab_path, 5)
    out = tok(["a red circle at the top left", b"photo of a red circle"])
    assert out[0].tolist() == [101, ID["a"], ID["red"], ID["circle"], ID["at"]]
    assert out[1].tolist() == [101, ID["photo"], ID["of"], ID["a"], ID["red"]]  # bytes accepted
    assert 102 not in out


def test_empty_caption(vocab_path):
    tok = Tokenizer(vocab_path, 6)
    assert tok(["", "   "]).tolist() == [[101, 0, 0, 0, 0, 0]] * 2
    assert tok([]).shape == (0, 6)


def test_bad_inputs(vocab_path, tmp_path):
    with pytest.raises(TypeError, match="list of captions"):
        Tokenizer(vocab_path, 4)("a red circle")
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n[UNK]\nred\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no \[CLS\]"):
        Tokenizer(bad, 4)
    dup = tmp_path / "dup.txt"
    dup.write_text("[UNK]\n[CLS]\nred\nred\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'red' appears on lines 3 and 4"):
        Tokenizer(dup, 4)


def test_build_vocab_bert_layout_and_round_trip(tmp_path):
    captions = ["a large red circle at the top left", "a small blue square in the centre",
                "a photo of a green triangle at the bottom right."] * 20
    path = tmp_path / "vocab.txt"
    n = build_vocab(captions, path, vocab_size=300)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == n and lines[:104] == BERT_SPECIAL_TOKENS
    assert {"circle", "square", "triangle", "red", "photo"} <= set(lines)
    tok = Tokenizer(path, 10)
    ids = tok(["A large red circle."])[0]
    assert [lines[i] for i in ids[: 1 + 5]] == ["[CLS]", "a", "large", "red", "circle", "."]
    # Unseen letters are [UNK]; seen letters still spell unseen words through ## pieces.
    assert 100 in tok(["zzz"])[0] and 100 not in tok(["carrot"])[0]


def test_vocab_command_trains_on_a_caption_file(tmp_path, capsys):
    captions = ["a large red circle at the top left", "", "a photo of a green triangle."] * 20
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
    T.main(["--corpus", str(corpus), "--out", str(tmp_path / "vocab.txt"), "--size", "300"])
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert capsys.readouterr().out == f"wrote {len(lines)} tokens to {tmp_path / 'vocab.txt'}\n"
    assert lines[:104] == BERT_SPECIAL_TOKENS and {"circle", "triangle", "photo", "green"} <= set(lines)
    tok = Tokenizer(tmp_path / "vocab.txt", 8)
    assert 100 not in tok(["a red triangle at the left."])[0]
    with pytest.raises(FileNotFoundError, match="nothing.txt not found; expected a UTF-8 text file"):
        T.build_vocab_file(tmp_path / "nothing.txt", tmp_path / "v.txt", 300)


def test_build_vocab_is_the_same_on_every_run(tmp_path):
    """The demos' scores depend on the vocab: it must not change between runs on the same corpus (HF's
    WordPiece trainer breaks ties in hash order and does)."""
    import random
    rng = random.Random(0)
    words = ["red", "green", "blue", "circle", "square", "triangle", "large", "small", "top", "left", "photo"]
    captions = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)]
    build_vocab(captions, tmp_path / "a.txt", vocab_size=300)
    build_vocab(captions, tmp_path / "b.txt", vocab_size=300)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    lines = (tmp_path / "a.txt").read_text(encoding="utf-8").splitlines()
    assert set(words) <= set(lines) and "##e" in lines
    with pytest.raises(ValueError, match="too small"):
        build_vocab(captions, tmp_path / "c.txt", vocab_size=106)
