"""Text data for language models: the byte-level BPE, `text_prepare` (text / JSONL / Parquet, manifest, uint16,
held-out split, errors naming the file) and the token iterators (exact resume, disjoint process ranges)."""

import json

import numpy as np
import pytest

from crate_jax.data.tokens import prepare as TP
from crate_jax.data.tokens import loader as TT
from crate_jax.text.bpe import BPETokenizer, train_bpe

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbled boxes of "
         "bright red apples near the old stone bridge").split()


def documents(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 90)))) + f" Doc {i}." for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = documents()
    with open(d / "docs.jsonl", "w") as f:
        for t in docs[:30]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    for i, t in enumerate(docs[30:]):
        (d / f"doc{i}.txt").write_text(t, encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": documents(10, seed=1)}), d / "more.parquet")
    out = d / "prepared"
    manifest = TP.prepare([str(d / "docs.jsonl"), str(d / "doc*.txt"), str(d / "more.parquet")], out,
                          train_tokenizer=300, val_fraction=0.2, seed=1, shard_tokens=700, log=lambda m: None)
    return d, out, manifest


def test_bpe_roundtrip_and_loading_from_disk(tmp_path):
    tok = train_bpe(documents(), 300)
    assert tok.vocab_size == 300 and tok.eot_id == 0
    text = "Héllo, wörld! — the quick fox 123\n\ttabs"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte level: any string round-trips
    tok.save_vocab_merges(tmp_path / "gpt2_style")  # GPT-2's vocab.json + merges.txt
    for path in (tmp_path / "gpt2_style", tmp_path / "gpt2_style" / "vocab.json", tok.save(tmp_path / "t.json")):
        again = BPETokenizer.load(path)
        assert again.encode(text) == ids and again.eot_id == tok.eot_id
    assert tok.encode("a<|endoftext|>b")[1] == tok.eot_id  # the separator is never split


def test_prepare_writes_manifest_shards_and_a_held_out_split(corpus):
    d, out, m = corpus
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] + val["documents"] == 50 and val["documents"] > 0
    assert all(s["tokens"] == 700 for s in train["shards"][:-1]) and len(train["shards"]) > 1
    ds = TT.TokenDataset(out)
    tokens = ds.split("train").read(0, len(ds.split("train")))
    assert (tokens == m["eot_id"]).sum() == train["documents"]  # one end-of-text after each document
    tok = BPETokenizer.load(ds.tokenizer_path)
    first = tok.decode(tokens[:np.argmax(tokens == m["eot_id"])].tolist())
    assert first in documents() + documents(10, seed=1)
    # the held-out documents are those the seeded hash picks, independent of the data
    assert [TP.split_of(i, 1, 0.2) for i in range(50)].count("val") == val["documents"]


def test_train_iterator_resumes_exactly_and_processes_read_disjoint_ranges(corpus):
    _, out, _ = corpus
    ds = TT.TokenDataset(out)
    n = len(ds.split("train"))
    ranges = []
    for p in range(3):
        it = TT.LMTrainIterator(ds, block=16, batch_size=4, seed=7, process_index=p, process_count=3)
        ranges.append(it.range)
        lo, hi = it.range
        whole = ds.split("train").read(lo, hi - lo)
        for _ in range(3):  # every window lies inside this process's own range
            for row in next(it)["tokens"]:
                starts = [s for s in range(hi - lo - 16) if np.array_equal(whole[s:s + 17], row)]
                assert starts, "a window outside the process's range"
        state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as the checkpoints store it
        expect = [next(it)["tokens"] for _ in range(2)]
        again = TT.LMTrainIterator(ds, block=16, batch_size=4, seed=7, process_index=p, process_count=3)
        again.set_state(state)
        for e in expect:
            np.testing.assert_array_equal(next(again)["tokens"], e)
        it.close(), again.close()
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint, covering
    other = TT.LMTrainIterator(ds, block=16, batch_size=4, seed=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_eval_batches_score_every_held_out_token_once_across_processes(corpus):
    _, out, _ = corpus
    ds = TT.TokenDataset(out)
    total = TT.eval_windows(ds, "val", block=8)
    seen = []
    counts = []
    for p in range(2):
        batches = list(TT.eval_batches(ds, "val", block=8, batch_size=4, process_index=p, process_count=2))
        counts.append(len(batches))
        seen += [row for b in batches for row, keep in zip(b["tokens"], b["mask"]) if keep]
    assert counts[0] == counts[1] and len(seen) == total
    targets = np.concatenate([r[1:] for r in seen])
    np.testing.assert_array_equal(targets, ds.split("val").read(1, total * 8))


def test_bad_inputs_name_the_file(tmp_path, corpus):
    d, out, _ = corpus
    tok = str(out / "tokenizer.json")
    run = lambda *inputs, **kw: TP.prepare([str(p) for p in inputs], tmp_path / "o", tokenizer=tok,
                                           log=lambda m: None, **kw)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(TP.PrepareError, match=r"empty\.txt: empty file"):
        run(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(TP.PrepareError, match=r"latin1\.txt: not valid UTF-8 text \(byte 3"):
        run(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(TP.PrepareError, match=r"bad\.jsonl:2: no 'text' field"):
        run(tmp_path / "bad.jsonl")
    with pytest.raises(TP.PrepareError, match="no file matches"):
        run(tmp_path / "nothing*.txt")
    assert not (tmp_path / "o").exists()  # nothing half-written
    # a shard whose dtype does not match the manifest, and a missing shard
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    np.save(broken / "val_00000.npy", np.load(broken / "val_00000.npy").astype(np.int32))
    with pytest.raises(TT.TokenDataError, match=r"val_00000\.npy: shard dtype int32 does not match the manifest's"):
        TT.TokenDataset(broken).split("val")
    (broken / "train_00001.npy").unlink()
    with pytest.raises(TT.TokenDataError, match=r"train_00001\.npy: shard listed in the manifest is missing"):
        TT.TokenDataset(broken).split("train")
