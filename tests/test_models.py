"""Model structure: parameter counts pinned to docs/math.md, scan == unrolled, bf16, attention paths, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crate_jax.models import ConfigError, abstract_model, build_model, count_params, model_config
from crate_jax.models import layers as L
from crate_jax.models.flops import forward_flops
from crate_jax.info import xla_forward_flops

# docs/math.md §Sizes (224 px, 1000 classes) and big_vision ViT.
PINNED = {
    ("crate", "T/16"): 6_090_856, ("crate", "S/16"): 13_116_328, ("crate", "B/16"): 22_796_008,
    ("crate", "L/16"): 77_641_192,
    ("crate_alpha", "Ti/16"): 4_811_944, ("crate_alpha", "S/16"): 40_975_912, ("crate_alpha", "S/32"): 42_218_344,
    ("crate_alpha", "B/32"): 73_985_512, ("crate_alpha", "B/16"): 72_328_936, ("crate_alpha", "B/8"): 72_338_152,
    ("crate_alpha", "L/32"): 255_982_568, ("crate_alpha", "L/14"): 253_650_920, ("crate_alpha", "L/8"): 253_786_088,
    ("crate_alpha", "H/14"): 526_819_560, ("crate_alpha", "g/14"): 795_815_272,
    ("vit", "Ti/16"): 5_717_416, ("vit", "S/16"): 22_050_664, ("vit", "B/16"): 86_567_656,
    ("vit", "L/16"): 304_326_632, ("vit", "H/14"): 632_045_800,
}


@pytest.mark.parametrize("model,variant", sorted(PINNED))
def test_parameter_counts(model, variant):
    assert count_params(abstract_model(model_config(model, variant))) == PINNED[(model, variant)]


def small(model, **kw):
    base = dict(image_size=32, patch_size=8, depth=3, num_classes=7)
    base.update(kw)
    variant = {"crate": "T/8", "crate_alpha": "Ti/8", "vit": "Ti/8"}[model]
    return model_config(model, variant, **base)


def images(n=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


@pytest.mark.parametrize("model", ["crate", "crate_alpha", "vit"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unrolled(model, remat):
    cfg = small(model, remat=remat)
    unrolled = build_model(cfg, 1)
    scanned = build_model(cfg.replace(scan=True), 1)
    x = images()
    a, b = unrolled(x), scanned(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # same parameter layout: the checkpoints are interchangeable
    sa, sb = nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    if remat == "none":
        return
    # and gradients through scan + remat agree with the unrolled, rematerialised model
    def loss(m):
        return jnp.sum(m(x) ** 2)
    ga = jax.tree.leaves(nnx.grad(loss)(unrolled))
    gb = jax.tree.leaves(nnx.grad(loss)(scanned))
    for u, v in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["crate", "crate_alpha", "vit"])
def test_bf16_compute_close_to_f32(model):
    cfg = small(model, num_classes=0)  # pooled features (the ViT head is zero-initialised)
    f32 = build_model(cfg, 2)
    bf16 = build_model(cfg.replace(dtype="bfloat16"), 2)
    x = images()
    a, b = f32(x), bf16(x)
    assert b.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    b = np.asarray(b, np.float32)
    assert np.isfinite(b).all()
    rel = np.linalg.norm(b - np.asarray(a)) / np.linalg.norm(np.asarray(a))
    assert rel < 5e-2, rel


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_explicit_softmax(causal):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 3, 16)) for i in range(3))
    a = L.attend(q, k, v, impl="fused", causal=causal)
    b = L.attend(q, k, v, impl="explicit", causal=causal)
    # the textbook formula, written out
    logits = np.einsum("btkp,bskp->bkts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 4.0
    if causal:
        logits = np.where(np.tril(np.ones((9, 9), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bkts,bskp->btkp", w, np.asarray(v, np.float64))
    np.testing.assert_allclose(np.asarray(a), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["crate", "crate_alpha"])
def test_model_attention_impls_agree(model):
    cfg = small(model)
    a = build_model(cfg, 3)(images())
    b = build_model(cfg.replace(attention="explicit"), 3)(images())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_causal_mssa_ignores_future_tokens():
    cfg = small("crate_alpha", causal=True, num_classes=0)
    m = build_model(cfg, 0)
    x = m.embed(images())
    y1, _ = m.encoder(x)
    y2, _ = m.encoder(x.at[:, 5:].set(0.0))
    np.testing.assert_allclose(np.asarray(y1[:, :5]), np.asarray(y2[:, :5]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(y1[:, 5:]), np.asarray(y2[:, 5:]))


def test_odl_fields_change_the_model():
    base = small("crate_alpha")
    tied = build_model(base.replace(odl_decoupled=False), 0)
    assert count_params(tied) == count_params(build_model(base, 0)) - 3 * base.width * 4 * base.width
    wide = build_model(base.replace(odl_ratio=2), 0)
    assert wide.encoder.blocks.odl.D.shape == (3, base.width, 2 * base.width)
    one = build_model(base.replace(odl_steps=1), 0)
    three = build_model(base.replace(odl_steps=3), 0)
    assert not np.allclose(np.asarray(one(images())), np.asarray(three(images())))


def test_dropout_and_drop_path_are_stochastic_only_in_training():
    cfg = small("crate_alpha", dropout=0.1, drop_path=0.2)
    m = build_model(cfg, 0)
    x = images()
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(m(x, train=False, rng=jax.random.key(1))))
    t1 = m(x, train=True, rng=jax.random.key(1))
    t2 = m(x, train=True, rng=jax.random.key(2))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(m(x, train=True, rng=jax.random.key(1))))


def test_every_parameter_has_logical_axes():
    m = abstract_model(small("crate_alpha"))
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
    assert m.encoder.blocks.mssa.proj.kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_analytic_flops_match_xla():
    for model in ("crate", "crate_alpha", "vit"):
        cfg = model_config(model, {"crate": "T/16", "crate_alpha": "Ti/16", "vit": "Ti/16"}[model])
        assert abs(xla_forward_flops(cfg) / forward_flops(cfg) - 1) < 0.02


@pytest.mark.parametrize("kw,msg", [
    (dict(image_size=30), "not divisible by patch size"),
    (dict(num_heads=5), "not divisible by 5 heads"),
    (dict(pool="mean"), "always pools the cls token"),
    (dict(remat="some"), "expected one of"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        small("crate_alpha", **kw)


def test_unknown_variant_and_wrong_image_size():
    with pytest.raises(ConfigError, match="unknown crate_alpha variant 'X/16'"):
        model_config("crate_alpha", "X/16")
    m = build_model(small("crate"), 0)
    with pytest.raises(ConfigError, match=r"expects NHWC \[B, 32, 32, 3\]"):
        m(jnp.zeros((1, 48, 48, 3)))
