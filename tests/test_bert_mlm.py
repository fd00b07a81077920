"""The `mlm` task: packed rows and dynamic masking (15 %, 80/10/10, specials never masked), an exactly resumable
iterator, and the shrunk `configs/mlm.py` through the engine: 1 device uninterrupted = the same run killed after
its first checkpoint and resumed on 8 simulated devices (data=2, fsdp=2, tensor=2, vocabulary over `tensor`)."""

import json
import shutil

import numpy as np
import pytest

from crate_jax.configs import mlm
from crate_jax.data.tokens import prepare as TP
from crate_jax.data.tokens.loader import TokenDataset
from crate_jax.mlm import data as D
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.metrics import read_metrics
from crate_jax.train.setup import Setup
from test_lm_data import documents


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm_data")
    with open(d / "docs.jsonl", "w") as f:
        for t in documents(60):
            f.write(json.dumps({"text": t}) + "\n")
    TP.prepare([str(d / "docs.jsonl")], d / "prepared", train_tokenizer=300, val_fraction=0.2, seed=0,
               log=lambda m: None)
    return d / "prepared"


def test_vocab_packing_and_masking_statistics(prepared):
    ds = TokenDataset(prepared)
    v = D.MLMVocab.of(ds)  # a trained BPE has no RoBERTa specials: they go in front, ids shift by 4
    assert (v.bos, v.pad, v.eos, v.mask, v.offset, v.size) == (0, 1, 2, 3, 4, ds.vocab_size + 4)
    body = ds.split("train").read(0, 200)
    row = D.pack_row(v, body)
    assert row[0] == v.bos and row[-1] == v.eos and v.eot not in row
    assert np.array_equal(row[1:-1][body != ds.eot_id], body[body != ds.eot_id] + 4)
    assert np.all(row[1:-1][body == ds.eot_id] == v.eos)  # documents separated by </s>
    rng = np.random.default_rng(0)
    pool = v.ordinary()
    rows = np.stack([D.pack_row(v, ds.split("train").read(i * 50, 510)) for i in range(20)])
    inputs, labels = zip(*(D.mask_row(r, v, D.Masking(), pool, rng) for r in rows))
    inputs, labels = np.stack(inputs), np.stack(labels)
    chosen = labels != D.IGNORE
    special = np.isin(rows, v.specials)
    assert not (chosen & special).any() and np.array_equal(labels[chosen], rows[chosen])
    assert np.array_equal(inputs[~chosen], rows[~chosen])
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.01
    frac = lambda m: (m & chosen).sum() / chosen.sum()
    assert abs(frac(inputs == v.mask) - 0.8) < 0.03
    changed = (inputs != rows) & (inputs != v.mask)
    assert abs(frac(changed) - 0.1) < 0.03 and not np.isin(inputs[changed], v.specials).any()


def test_iterator_resumes_exactly(prepared):
    ds = TokenDataset(prepared)
    v = D.MLMVocab.of(ds)
    kw = dict(seq_len=32, batch_size=4, seed=3, num_threads=1)
    a = D.MLMTrainIterator(ds, v, **kw)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    want = [next(a) for _ in range(3)]
    b = D.MLMTrainIterator(ds, v, **kw)
    b.set_state(state)
    got = [next(b) for _ in range(3)]
    for x, y in zip(want, got):
        for k in ("tokens", "labels"):
            np.testing.assert_array_equal(x[k], y[k])
    assert (want[0]["labels"] != D.IGNORE).any()
    with pytest.raises(ValueError, match="seq_len"):
        D.MLMTrainIterator(ds, v, **{**kw, "seq_len": 16}).set_state(state)


def shrunk(data, model="crate_bert", **kw):
    c = mlm.get_config(f"model={model},data={data},seq_len=16,batch=8,steps=3,width=32,depth=2,heads=4,"
                       f"dtype=float32,dropout=0.0,warmup=1,eval_rows=8,eval_batch=8,log_every=1,ckpt_every=1")
    c.async_checkpoints = False
    c.keep_checkpoints = 5
    for k, v in kw.items():
        c[k] = v
    return c


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r}


@pytest.mark.parametrize("model", ["crate_bert", "bert"])
def test_sharded_resume_equals_uninterrupted_one_device(prepared, tmp_path, model):
    one = shrunk(prepared, model)
    one.mesh = dict(num_devices=1)
    ref = train_and_evaluate(one, tmp_path / "one")
    assert {"eval/val/loss", "eval/val/accuracy"} <= set(ref) and ref["eval/val/tokens"] > 0
    assert "perf/tokens_per_s" in read_metrics(tmp_path / "one" / "metrics.jsonl")[-1]
    a = train_losses(tmp_path / "one")
    assert sorted(a) == [1, 2, 3] and all(np.isfinite(list(a.values())))

    shutil.copytree(tmp_path / "one", tmp_path / "eight")  # killed after step 1's checkpoint
    for step in ("2", "3"):
        shutil.rmtree(tmp_path / "eight" / "checkpoints" / step)
    eight = shrunk(prepared, model, mesh=dict(data=2, fsdp=2, tensor=2))
    eight.evals = {}
    setup = Setup(eight, make_mesh(eight.mesh))
    assert tuple(setup.state_sh["params"]["embeddings"]["word"]["embedding"].spec) == ("tensor", "fsdp")  # 304 rows
    train_and_evaluate(eight, tmp_path / "eight")
    b = train_losses(tmp_path / "eight")
    assert sorted(b) == [1, 2, 3] and b[1] == a[1]
    np.testing.assert_allclose([b[2], b[3]], [a[2], a[3]], rtol=1e-5)
