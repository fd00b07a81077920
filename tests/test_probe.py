"""k-NN and linear probe on synthetic features of known accuracy, and at chance on shuffled labels; the
evaluators' config errors."""

import math

import numpy as np
import pytest
from ml_collections import ConfigDict

from crate_jax.errors import ConfigError
from crate_jax.parallel.mesh import make_mesh
from crate_jax.probe.knn import KNNEvaluator, knn_accuracy
from crate_jax.probe.linear_probe import linear_probe, stratified_holdout

MESH = {"data": 4, "fsdp": 2, "tensor": 1}


def clusters(noise_seed, n, classes=4, d=16, sep=6.0):
    """Unit-variance clusters around 4 fixed random centres (sd 6 apart per coordinate): separable."""
    centres = np.random.default_rng(0).standard_normal((classes, d)) * sep
    y = np.arange(n) % classes
    noise = np.random.default_rng(noise_seed).standard_normal((n, d))
    return (centres[y] + noise).astype(np.float32), y.astype(np.int32)


def bayes_pair(seed, n, d=8):
    """Two classes differing only along feature 0 (means ±1, unit variance): Bayes accuracy Φ(1) = 0.8413."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d))
    x[:, 0] += np.where(y == 1, 1.0, -1.0)
    return x.astype(np.float32), y.astype(np.int32)


def test_separable_set_is_classified_and_shuffled_labels_give_chance():
    mesh = make_mesh(MESH)
    xtr, ytr = clusters(1, 400)
    xte, yte = clusters(2, 200)
    assert knn_accuracy(xtr, ytr, xte, yte, mesh=mesh)["top1"] == 1.0
    lp = linear_probe(xtr, ytr, xte, yte, steps=100, lambdas=(1e-4, 1e-2))
    assert lp["top1"] == 1.0 and lp["val_top1"] == 1.0
    # shuffled labels: nothing to learn, so chance (0.25) within sampling noise (sd 0.03 on 200)
    perm = np.random.default_rng(5)
    ytr_s, yte_s = perm.permutation(ytr), perm.permutation(yte)
    assert abs(knn_accuracy(xtr, ytr_s, xte, yte_s, mesh=mesh)["top1"] - 0.25) < 0.12
    assert abs(linear_probe(xtr, ytr_s, xte, yte_s, steps=100, lambdas=(1e-4, 1e-2, 1.0))["top1"] - 0.25) < 0.12


def test_known_bayes_accuracy():
    mesh = make_mesh(MESH)
    xtr, ytr = bayes_pair(0, 1000)
    xte, yte = bayes_pair(1, 2000)
    bayes = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # Φ(1)
    lp = linear_probe(xtr, ytr, xte, yte, steps=100, lambdas=(1e-3, 1e-1))
    assert abs(lp["top1"] - bayes) < 0.03, lp
    knn = knn_accuracy(xtr, ytr, xte, yte, mesh=mesh, k=20, temperature=0.07)
    assert bayes - 0.12 < knn["top1"] <= bayes + 0.03, knn  # 7 noise dimensions cost k-NN some accuracy
    assert knn["top5"] == 1.0  # two classes


def test_holdout_is_stratified_and_fixed():
    y = np.repeat(np.arange(5), 10)
    a, b = stratified_holdout(y, 0.2, 0), stratified_holdout(y, 0.2, 0)
    np.testing.assert_array_equal(a, b)
    assert [int(a[y == c].sum()) for c in range(5)] == [2] * 5


def test_evaluator_config_errors_name_the_key():
    from crate_jax.configs import digits
    from crate_jax.train.setup import make_task
    cfg = digits.get_config("steps=2")
    task = make_task(cfg)
    mesh = make_mesh(MESH)
    with pytest.raises(ConfigError, match=r"config.evals.knn.k: expected an integer >= 1"):
        KNNEvaluator("knn", ConfigDict(dict(type="knn", k=0)), task, mesh)
    with pytest.raises(ConfigError, match=r"config.evals.knn: unknown keys \['kk'\]"):
        KNNEvaluator("knn", ConfigDict(dict(type="knn", kk=3)), task, mesh)
    with pytest.raises(ConfigError, match=r"config.evals.knn.params"):
        KNNEvaluator("knn", ConfigDict(dict(type="knn", params="ema")), task, mesh)
