"""The SimDINO loss against a float64 numpy reference (the official `MCRLoss` with `--reduce_cov 1`), on
1 device and on 8 simulated devices with the batch sharded over (data, fsdp); the logdet stays finite
(value and gradient) on rank-deficient batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from crate_jax.parallel.mesh import make_mesh
from crate_jax.ssl.simdino_loss import check_conditioning, coding_rate, simdino_loss

EPS_SQ = 0.5


def reference(student, teacher, eps_sq, expa_type=1, coeff=1.0):
    """Float64 numpy, written from the official `MCRLoss` (global covariance, `reduce_cov=1`)."""
    s = student / np.linalg.norm(student, axis=-1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=-1, keepdims=True)
    V, M, p = s.shape
    total, terms = 0.0, 0
    for g in range(t.shape[0]):
        for v in range(V):
            if v == g:
                continue
            total += np.mean(np.sum(t[g] * s[v], -1))
            terms += 1
    comp = total / terms
    rates = []
    for g in range(t.shape[0]):
        Z = (s[g] + t[g]) / 2 if expa_type == 1 else s[g]
        sign, logdet = np.linalg.slogdet(np.eye(p) + p / (M * eps_sq) * Z.T @ Z)
        assert sign > 0
        rates.append(0.5 * logdet)
    gamma = (p + M) / (p * M)
    return -coeff * comp - gamma * np.mean(rates), comp, np.mean(rates)


def features(seed, V=4, M=16, p=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, M, p)), rng.standard_normal((2, M, p))


@pytest.mark.parametrize("expa_type", [0, 1])
def test_loss_equals_the_float64_reference_on_1_and_8_devices(expa_type):
    s, t = features(0)
    want, comp, rate = reference(s, t, EPS_SQ, expa_type)
    fn = jax.jit(lambda a, b: simdino_loss(a, b, eps_sq=EPS_SQ, expa_type=expa_type))
    one, m1 = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    assert float(one) == pytest.approx(want, rel=2e-6)
    assert float(m1["comp"]) == pytest.approx(comp, rel=2e-6) and float(m1["rate"]) == pytest.approx(rate, rel=2e-6)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))  # each device holds 4 of the 16 rows
    a, b = jax.device_put(jnp.asarray(s, jnp.float32), sh), jax.device_put(jnp.asarray(t, jnp.float32), sh)
    eight, _ = fn(a, b)
    assert float(eight) == pytest.approx(want, rel=2e-6)
    # a per-device covariance (the official default, reduce_cov=0) would give another number
    local = np.mean([reference(s[:, i::4], t[:, i::4], EPS_SQ * 4, expa_type)[0] for i in range(4)])
    assert abs(local - want) > 1e-3
    # float64 host factorisation: same value, same gradient, under the 8-device sharding too
    fn64 = jax.jit(jax.value_and_grad(lambda a, b: simdino_loss(a, b, eps_sq=EPS_SQ, expa_type=expa_type,
                                                                logdet_dtype="float64")[0]))
    fn32 = jax.jit(jax.value_and_grad(lambda a, b: simdino_loss(a, b, eps_sq=EPS_SQ, expa_type=expa_type)[0]))
    v64, g64 = fn64(a, b)
    v32, g32 = fn32(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    assert float(v64) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(g64), np.asarray(g32), rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences_of_the_reference():
    s, t = features(1, V=3, M=6, p=4)
    grad = np.asarray(jax.jit(jax.grad(lambda a, b: simdino_loss(a, b, eps_sq=EPS_SQ)[0]))(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))
    h = 1e-6
    for idx in [(0, 0, 0), (1, 3, 2), (2, 5, 1)]:
        up, down = s.copy(), s.copy()
        up[idx] += h
        down[idx] -= h
        fd = (reference(up, t, EPS_SQ)[0] - reference(down, t, EPS_SQ)[0]) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("logdet_dtype", ["float32", "float64"])
def test_logdet_is_finite_on_rank_deficient_batches(logdet_dtype):
    p, M = 256, 64
    rng = np.random.default_rng(2)
    one = np.tile(rng.standard_normal((1, p)), (M, 1))  # total collapse: rank 1
    cases = {"rank 1": one, "zeros": np.zeros((M, p)), "rank 3": rng.standard_normal((M, 3)) @ rng.standard_normal((3, p)),
             "M < p": rng.standard_normal((M, p))}
    eps_sq = 0.05  # the README's ImageNet value: cond(A) <= 1 + 256/0.05
    fn = jax.jit(jax.value_and_grad(lambda s, t: simdino_loss(s, t, eps_sq=eps_sq, logdet_dtype=logdet_dtype)[0]))
    for name, z in cases.items():
        s = jnp.asarray(np.stack([z] * 4), jnp.float32)
        value, grad = fn(s, s[:2])
        assert np.isfinite(float(value)), name
        assert np.isfinite(np.asarray(grad)).all(), name
    # a collapsed batch has a rate of ½ log(1 + p/ε²) (one non-zero eigenvalue), a spread one far more
    unit = one / np.linalg.norm(one, axis=-1, keepdims=True)
    r1 = float(coding_rate(jnp.asarray(unit, jnp.float32), eps_sq, logdet_dtype))
    assert r1 == pytest.approx(0.5 * math.log(1 + p / eps_sq), rel=5e-5 if logdet_dtype == "float32" else 1e-6)
    with pytest.raises(ValueError, match="condition number"):
        check_conditioning(256, 1e-5, "float32")
    check_conditioning(256, 1e-5, "float64")
