"""The official DINO / SimDINO ViT flavour (`init='dino'`, `gelu='erf'`, `pos_resize='dino'`) and DINO's
schedule grid (`optim.dino_schedule`), each against the official definition."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from crate_jax.models import ConfigError, build_model, model_config
from crate_jax.models import posemb
from crate_jax.models.self_distill import position_table_at
from crate_jax.train.optim import schedule, wd_schedule


def _vit(**kw):
    kw = dict(image_size=32, width=96, depth=2, num_heads=3, mlp_dim=384, num_classes=10) | kw
    return model_config("vit", "S/4", **kw)


def test_dino_init_statistics():
    m = build_model(_vit(init="dino"), seed=0)
    p = jax.tree.map(np.asarray, {"qkv": m.encoder.blocks.attn.query.kernel[...], "fc1": m.encoder.blocks.mlp.fc1.kernel[...],
                                  "fc1_b": m.encoder.blocks.mlp.fc1.bias[...], "conv": m.embedding.kernel[...],
                                  "conv_b": m.embedding.bias[...], "pos": m.pos_embedding[...], "cls": m.cls[...],
                                  "head": m.head.kernel[...], "head_b": m.head.bias[...]})
    for k in ("qkv", "fc1", "head", "pos"):  # trunc-normal(0.02): std 0.02, nothing beyond ±2 (absolute)
        assert p[k].std() == pytest.approx(0.02, rel=0.05), k
    assert np.all(p["fc1_b"] == 0) and np.all(p["head_b"] == 0)
    bound = 1 / math.sqrt(4 * 4 * 3)  # torch Conv2d default: U(±1/√fan_in) for weight and bias
    for k in ("conv", "conv_b"):
        assert np.abs(p[k]).max() <= bound and np.abs(p[k]).max() > 0.9 * bound, k
    assert p["cls"].std() == pytest.approx(0.02, rel=0.5) and np.any(p["cls"] != 0)
    default = build_model(_vit(), seed=0)  # the big_vision ViT is unchanged: xavier, zero cls, 1e-6 MLP bias
    assert np.all(np.asarray(default.cls[...]) == 0)
    assert np.abs(np.asarray(default.encoder.blocks.mlp.fc1.bias[...])).max() < 1e-4


def test_erf_gelu_changes_only_the_activation():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a = build_model(_vit(init="dino", gelu="erf"), seed=0)
    b = build_model(_vit(init="dino"), seed=0)
    ya, yb = np.asarray(a(x)), np.asarray(b(x))
    assert 0 < np.abs(ya - yb).max() < 1e-2  # same weights, different GELU
    h = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(np.asarray(a.encoder.blocks.mlp.approximate), False)
    np.testing.assert_allclose(np.asarray(jax.nn.gelu(h, approximate=False)),
                               0.5 * np.asarray(h) * (1 + np.vectorize(math.erf)(np.asarray(h) / math.sqrt(2))),
                               atol=1e-6)


def test_flavour_fields_are_validated():
    with pytest.raises(ConfigError, match="init"):
        model_config("crate_alpha", "Ti/16", init="dino")
    with pytest.raises(ConfigError, match="gelu"):
        _vit(gelu="sigmoid")
    with pytest.raises(ConfigError, match="pos_resize"):
        _vit(pos_resize="bilinear")


def test_local_crop_table_is_torch_bicubic():
    torch = pytest.importorskip("torch")
    m = build_model(_vit(init="dino", pos_resize="dino", num_classes=0), seed=3)  # grid 8
    pos = np.asarray(m.pos_embedding[...], np.float64)
    for grid in (3, 4, 12):
        got = np.asarray(position_table_at(m, grid))
        t = torch.tensor(pos[0, 1:].reshape(8, 8, -1)).permute(2, 0, 1)[None]
        s = (grid + 0.1) / 8
        want = torch.nn.functional.interpolate(t, scale_factor=(s, s), mode="bicubic")[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got[0, 1:].reshape(grid, grid, -1), want, atol=2e-6)
        np.testing.assert_array_equal(got[0, 0], np.asarray(m.pos_embedding[...])[0, 0])
    jax_table = np.asarray(position_table_at(build_model(_vit(init="dino", num_classes=0), seed=3), 3))
    assert np.abs(jax_table[0, 1:] - np.asarray(position_table_at(m, 3))[0, 1:]).max() > 1e-4  # antialiased


def test_torch_bicubic_matrix_rows_sum_to_one():
    m = posemb.torch_bicubic_matrix(14, 6.1 / 14)
    assert m.shape == (6, 14)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)


def _official_cosine(base, final, total, warmup):
    """DINO `utils.cosine_scheduler` with `niter_per_ep = 1`, written from its definition."""
    warm = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_dino_schedule_is_the_official_grid(warmup):
    T = 20
    cfg = ConfigDict(dict(lr=1e-3, min_lr=1e-6, warmup_steps=warmup, wd=0.04, wd_end=0.4, dino_schedule=True))
    lr, wd = schedule(cfg, T), wd_schedule(cfg, T)
    steps = np.arange(T)
    np.testing.assert_allclose([float(lr(t)) for t in steps], _official_cosine(1e-3, 1e-6, T, warmup), rtol=2e-6,
                               atol=1e-12)
    np.testing.assert_allclose([float(wd(t)) for t in steps], _official_cosine(0.04, 0.4, T, 0), rtol=2e-6)
    cfg.dino_schedule = False  # the default grid differs: warm-up t/W, weight decay over t/(T − 1)
    if warmup > 1:
        assert float(schedule(cfg, T)(1)) != pytest.approx(float(lr(1)))
    assert float(wd_schedule(cfg, T)(T - 1)) == pytest.approx(0.4)
