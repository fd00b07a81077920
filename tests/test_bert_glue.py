"""GLUE fine-tuning (`configs/glue.py`, task `glue`) on TFDS mock data: from a converted CRATE-BERT bundle (its
MLM head dropped, pooler and classifier fresh) and from scratch for BERT on the regression task; the GLUE
metrics against scikit-learn / scipy; the sentence-pair row format."""

import json

import numpy as np
import pytest

import reference_bert_np as R
from crate_jax import convert
from crate_jax.checkpoint.params import read_params
from crate_jax.configs import glue as glue_config
from crate_jax.data.tokens import prepare as TP
from crate_jax.mlm import glue_metrics as GM
from crate_jax.mlm.glue import TextEncoder
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.metrics import read_metrics
from test_lm_data import documents

tfds = pytest.importorskip("tensorflow_datasets")
T = 24


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue_vocab")
    with open(d / "docs.jsonl", "w") as f:
        for t in documents(40) + ["abcdefghij " * 20]:  # the mock data's letters are in the vocabulary
            f.write(json.dumps({"text": t}) + "\n")
    TP.prepare([str(d / "docs.jsonl")], d / "prepared", train_tokenizer=300, val_fraction=0.2, seed=0,
               log=lambda m: None)
    return d / "prepared"


def test_metrics_match_scikit_learn_and_scipy():
    from scipy import stats
    from sklearn import metrics
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert GM.f1(p, y) == pytest.approx(metrics.f1_score(y, p))
    assert GM.matthews(p, y) == pytest.approx(metrics.matthews_corrcoef(y, p))
    assert GM.accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))
    a, b = rng.normal(size=100), np.round(rng.normal(size=100), 1)  # ties in the ranks
    assert GM.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert GM.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


def test_pair_rows_follow_roberta_format(vocab_dir):
    enc = TextEncoder(vocab_dir, 16)
    v = enc.vocab
    tokens, mask = enc.row(["the cat " * 10, "a dog"])
    n = int(mask.sum())
    assert n == 16 and tokens[0] == v.bos and tokens[n - 1] == v.eos
    assert list(tokens).count(v.eos) == 3  # <s> A </s></s> B </s>, A truncated first (the longer one)
    tokens, mask = enc.row(["hi"])
    assert tokens[int(mask.sum()) - 1] == v.eos and (tokens[int(mask.sum()):] == v.pad).all()


def _config(vocab_dir, **kw):
    args = ",".join(f"{k}={v}" for k, v in dict(vocab=vocab_dir, seq_len=T, batch=8, steps=3, lr=1e-3, dropout=0.0,
                                                 log_every=1, ckpt_every=100, **kw).items())
    c = glue_config.get_config(args)
    c.async_checkpoints = False
    c.mesh = dict(data=2, fsdp=2, tensor=2)
    return c


def test_finetune_sst2_from_converted_crate_bert_bundle(vocab_dir, tmp_path):
    V = TextEncoder(vocab_dir, T).vocab.size
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_crate_bert_state_dict(0, vocab=V, positions=T + 2, dim=32, depth=2).items()}
    np.savez(tmp_path / "crate.npz", **sd)
    assert convert.main(["--format", "crate-bert-hf", "--input", str(tmp_path / "crate.npz"), "--output",
                         str(tmp_path / "bundle"), "--heads", "4"]) == 0
    c = _config(vocab_dir, task="sst2", init=tmp_path / "bundle")
    with tfds.testing.mock_data(num_examples=24):
        out = train_and_evaluate(c, tmp_path / "run")
    assert 0.0 <= out["eval/val/accuracy"] <= 1.0 and out["eval/val/count"] == 24
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    tuned = read_params(tmp_path / "run")
    assert "mlm_head" not in tuned and tuned["classifier"]["kernel"].shape == (32, 2)
    before = read_params(tmp_path / "bundle")["embeddings"]["word"]["embedding"]
    assert not np.array_equal(tuned["embeddings"]["word"]["embedding"], before)  # fine-tuned, from the bundle
    assert np.abs(tuned["embeddings"]["word"]["embedding"] - before).max() < 0.05


def test_finetune_stsb_regression_bert_from_scratch(vocab_dir, tmp_path):
    c = _config(vocab_dir, task="stsb", model="bert", width=32, depth=2, heads=4)
    with tfds.testing.mock_data(num_examples=24):
        out = train_and_evaluate(c, tmp_path / "run")
    assert {"eval/val/pearson", "eval/val/spearman"} <= set(out)
    assert -1.0 <= out["eval/val/pearson"] <= 1.0
    assert read_params(tmp_path / "run")["classifier"]["kernel"].shape == (32, 1)
