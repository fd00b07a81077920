"""The self-supervised demo's table: one entry per row with the mean and spread over seeds (what `make demo-ssl`
writes to results.json), its configs build, and the SimDINO / DINO pair differs only in the loss."""

import json

import numpy as np
import pytest

from crate_jax.demos import ssl as demo

KEYS = {"simdino", "simdino_init", "dino", "dino_init", "mae", "mae_init", "supervised_crate_alpha", "supervised_crate"}


def _fake_seed(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for key in demo.ROWS:
        m = {"eval/knn/top1": float(rng.uniform(0.4, 0.9)), "eval/linear/top1": float(rng.uniform(0.4, 0.9))}
        if key.startswith("supervised"):
            m["eval/val/top1"] = float(rng.uniform(0.5, 0.95))
        out[key] = m
    return out


def test_summary_has_every_row_with_mean_std_and_seed_count():
    per_seed = {s: _fake_seed(s) for s in (0, 1, 2)}
    summary = demo.summarize(per_seed)
    assert KEYS <= set(summary)
    for key, row in summary.items():
        for metric in ("knn_top1", "linear_top1"):
            values = [per_seed[s][key][f"eval/{metric.split('_')[0]}/top1"] for s in (0, 1, 2)]
            assert row[metric]["seeds"] == 3 and row[metric]["values"] == values
            assert row[metric]["mean"] == pytest.approx(np.mean(values))
            assert row[metric]["std"] == pytest.approx(np.std(values, ddof=1))
        assert ("supervised_top1" in row) == key.startswith("supervised")
    json.dumps(summary)  # what results.json holds
    text = demo.table(summary)
    assert text.count("\n| ") == len(demo.ROWS) and "±" in text and "simdino: k-NN" in text


def test_one_seed_has_no_spread():
    row = demo.summarize({0: _fake_seed(0)})["simdino"]["knn_top1"]
    assert row["std"] is None and row["seeds"] == 1
    assert "±" not in demo.table(demo.summarize({0: _fake_seed(0)})).splitlines()[2]


def test_simdino_and_dino_share_everything_but_the_loss():
    from crate_jax.train.validate import validate_config
    sd, dn = demo.simdino_config(10, seed=1), demo.dino_config(10, seed=1)
    for c in (sd, dn, demo.mae_config(10, seed=1), demo.supervised_config("crate", 10, seed=1, lmbda=0.5)):
        validate_config(c)
        assert c.seed == 1
    assert sd.model.name == dn.model.name == "crate" and sd.crops == dn.crops and sd.data == dn.data
    assert (sd.loss.name, dn.loss.name) == ("simdino", "dino") and dn.model.prototypes == 1024
