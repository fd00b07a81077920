"""Optimizer construction (docs/math.md §Optimizer), schedule, weight-decay mask, freezing, Lion, mixup/cutmix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from crate_jax.classify.mixup import mixup_cutmix
from crate_jax.train.optim import build_optimizer, path_mask, schedule

PARAMS = {"embedding": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
          "encoder": {"blocks": {"odl": {"D": jnp.ones((3, 12))}, "ln1": {"scale": jnp.ones((3,))}}},
          "head": {"kernel": jnp.ones((3, 2))}, "t": jnp.ones((1,))}


def cfg(**kw):
    base = dict(name="adamw", lr=1e-2, min_lr=1e-4, warmup_steps=10, b1=0.9, b2=0.95, wd=0.1, wd_mask=r".*kernel",
                clip=1.0, freeze=[])
    base.update(kw)
    return ConfigDict(base)


def test_schedule_matches_spec_formula():
    lr = schedule(cfg(), total_steps=110)
    r = 1e-4 / 1e-2
    for t in (0, 5, 10, 60, 110, 200):
        warm = min(1.0, t / 10)
        prog = min(max((t - 10) / 100, 0.0), 1.0)
        want = 1e-2 * warm * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * prog)))
        assert float(lr(t)) == pytest.approx(want, rel=1e-5)


def test_weight_decay_only_on_kernels():
    mask = path_mask(PARAMS, r".*kernel")
    assert mask["embedding"]["kernel"] and mask["head"]["kernel"]
    assert not mask["encoder"]["blocks"]["odl"]["D"] and not mask["embedding"]["bias"] and not mask["t"]
    # zero gradients: only decayed leaves move (by lr·wd·θ after warm-up)
    tx, _ = build_optimizer(cfg(warmup_steps=0, clip=0.0), PARAMS, 100)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    assert float(upd["head"]["kernel"][0, 0]) == pytest.approx(-1e-2 * 0.1, rel=1e-5)
    assert float(jnp.abs(upd["encoder"]["blocks"]["odl"]["D"]).max()) == 0.0


def test_adam_update_matches_optax_reference_chain():
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), PARAMS)
    tx, _ = build_optimizer(cfg(warmup_steps=0, min_lr=0.0, clip=0.0), PARAMS, 100)
    ref = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95),
                      optax.add_decayed_weights(0.1, mask=path_mask(PARAMS, r".*kernel")),
                      optax.scale(-1e-2))
    a, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    b, _ = ref.update(grads, ref.init(PARAMS), PARAMS)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_freezing_by_regex_and_lion():
    tx, _ = build_optimizer(cfg(name="lion", freeze=["t", "encoder/.*"]), PARAMS, 100)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    state = tx.init(PARAMS)
    upd, _ = tx.update(grads, state, PARAMS)
    upd, _ = tx.update(grads, _, PARAMS)
    assert float(jnp.abs(upd["t"]).max()) == 0 and float(jnp.abs(upd["encoder"]["blocks"]["odl"]["D"]).max()) == 0
    assert float(jnp.abs(upd["head"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="freezes every parameter"):
        build_optimizer(cfg(freeze=[".*"]), PARAMS, 100)
    with pytest.raises(ValueError, match="expected one of"):
        build_optimizer(cfg(name="sgd"), PARAMS, 100)


def test_mixup_cutmix_soft_labels_are_consistent():
    images = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3))
    labels = jax.nn.one_hot(jnp.arange(8) % 4, 4)
    seen = set()
    for seed in range(12):
        x, y = mixup_cutmix(jax.random.key(seed), images, labels)
        np.testing.assert_allclose(np.asarray(y.sum(-1)), 1.0, rtol=1e-6)
        # the weight on the own label equals the share of own pixels (cutmix) or λ (mixup)
        is_cut = np.all(np.isclose(np.asarray(x[0]), np.asarray(images[0])) |
                        np.isclose(np.asarray(x[0]), np.asarray(images[-1])))
        if is_cut:
            frac = np.mean(np.all(np.isclose(np.asarray(x[0]), np.asarray(images[0])), -1))
            assert frac == pytest.approx(float(y[0, 0]), abs=1e-5)
        else:
            lam = float(y[0, 0])
            np.testing.assert_allclose(np.asarray(x[0]), lam * np.asarray(images[0]) + (1 - lam) * np.asarray(images[-1]),
                                       rtol=1e-4, atol=1e-5)
        seen.add(is_cut)
    assert seen == {True, False}, "both mixup and cutmix should occur over 12 draws"


def test_parameter_groups_scale_their_learning_rate():
    """`lr_mults`: the head's updates are half the base ones at every step (same Adam state), a group
    with multiplier 0 does not move, the rest is untouched; first match wins."""
    grads = jax.tree.map(lambda x: 0.3 * x + 0.1, PARAMS)
    base_tx, _ = build_optimizer(cfg(warmup_steps=0), PARAMS, 100)
    tx, _ = build_optimizer(cfg(warmup_steps=0, lr_mults=[("head/.*", 0.5), ("t", 0.0), (".*", 1.0)]), PARAMS, 100)
    sb, s = base_tx.init(PARAMS), tx.init(PARAMS)
    for _ in range(3):
        ub, sb = base_tx.update(grads, sb, PARAMS)
        u, s = tx.update(grads, s, PARAMS)
        np.testing.assert_allclose(u["head"]["kernel"], 0.5 * ub["head"]["kernel"], rtol=1e-6)
        np.testing.assert_array_equal(u["t"], 0.0 * ub["t"])
        np.testing.assert_array_equal(u["encoder"]["blocks"]["odl"]["D"], ub["encoder"]["blocks"]["odl"]["D"])
        assert float(jnp.abs(ub["head"]["kernel"]).max()) > 0


# ------------------------------------------------------------------ per-layer clipping (DINO's clip_gradients)
def _clip_reference(grads: dict, stacked: dict, max_norm: float, fuse_qkv: bool) -> dict:
    """Float64 numpy: the official per-module loop. A stacked parameter is one tensor per layer; with
    `fuse_qkv` the query / key / value kernels (and biases) of one layer are one tensor, as DINO's `qkv`."""
    flat = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    out = {}
    groups: dict[tuple, list[tuple[str, int | None]]] = {}
    for k, g in flat.items():
        base = k
        if fuse_qkv:
            for part in ("/query/", "/key/", "/value/"):
                base = base.replace(part, "/qkv/")
        for i in (range(g.shape[0]) if stacked[k] else [None]):
            groups.setdefault((base, i), []).append((k, i))
    for members in groups.values():
        norm = np.sqrt(sum(np.sum(np.square(flat[k] if i is None else flat[k][i])) for k, i in members))
        coef = max_norm / (norm + 1e-6)
        for k, i in members:
            out.setdefault(k, flat[k].copy())
            if coef < 1:
                if i is None:
                    out[k] = flat[k] * coef
                else:
                    out[k][i] = flat[k][i] * coef
    return out


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("fuse", [False, True])
def test_per_param_clipping_is_per_layer(scan, fuse):
    """Stacked block parameters are clipped layer by layer (each layer's slice is its own tensor, as in the
    official per-layer modules), and with `clip_fuse='qkv'` the query / key / value of a layer share one norm;
    scanned and unrolled models give the same result, equal to a float64 per-module reference."""
    from flax import nnx
    from crate_jax.models import build_model, model_config
    from crate_jax.parallel import sharding as sh
    from crate_jax.train.optim import clip_groups, clip_per_parameter, path_str
    cfg = model_config("vit", "Ti/8", image_size=16, depth=3, num_classes=4, scan=scan)
    params_state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param)
    params, axes = nnx.to_pure_dict(params_state), sh.state_axes(params_state)
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    grads = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=a.shape) * rng.uniform(0.1, 3.0), jnp.float32)
                                         for _, a in leaves])
    groups, stacked = clip_groups(params, axes, ["qkv"] if fuse else [])
    names = [path_str(p) for p, _ in leaves]
    flat_stacked = dict(zip(names, jax.tree.leaves(stacked)))
    assert any(flat_stacked.values()) and not all(flat_stacked.values())
    assert all(v == ("blocks" in k) for k, v in flat_stacked.items()), flat_stacked
    out, _ = clip_per_parameter(1.5, groups, stacked).update(grads, optax.EmptyState())
    want = _clip_reference(dict(zip(names, jax.tree.leaves(grads))), flat_stacked, 1.5, fuse)
    for name, got in zip(names, jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want[name], rtol=2e-6, atol=1e-7, err_msg=name)
    # the stacked norm is not the per-layer one: clipping the whole [L, ...] tensor at once differs
    whole, _ = clip_per_parameter(1.5).update(grads, optax.EmptyState())
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(out)))


def test_per_param_clipping_reaches_the_optimizer():
    """`build_optimizer` with the parameters' axes clips per layer: a layer whose gradient is small is left as it
    is although its sibling layer is huge. Adam with a huge eps makes the first update `g / (|g| + eps)`, which
    shows the clipped gradient's scale."""
    from crate_jax.parallel.sharding import Axes
    from crate_jax.train.optim import clip_groups
    params = {"blocks": {"w": jnp.zeros((2, 3))}, "head": jnp.zeros((3,))}
    axes = {"blocks": {"w": Axes(("layers", "embed"))}, "head": Axes(("embed",))}
    grads = {"blocks": {"w": jnp.array([[30.0, 40.0, 0.0], [0.3, 0.4, 0.0]])}, "head": jnp.array([0.1, 0.0, 0.0])}
    c = cfg(name="adamw", lr=1.0, min_lr=0.0, schedule="constant", clip=1.0, clip_mode="per_param", warmup_steps=0,
            wd=0.0, eps=1e3)
    eps = 1e3
    for ax, layer0 in ((axes, [0.6, 0.8, 0.0]), (None, [0.6, 0.8, 0.0])):
        tx, _ = build_optimizer(c, params, 10, ax)
        upd, _ = tx.update(grads, tx.init(params), params)
        clipped = np.asarray(-upd["blocks"]["w"]) * (np.abs(0) + eps)  # ~ the clipped gradient (|g| << eps)
        if ax is not None:  # per layer: layer 1 (norm 0.5) untouched
            np.testing.assert_allclose(clipped, [layer0, [0.3, 0.4, 0.0]], rtol=2e-3)
        else:  # one tensor: both layers scaled by 1 / 50.0025
            np.testing.assert_allclose(clipped[1], np.array([0.3, 0.4, 0.0]) / 50.0025, rtol=2e-3)
    with pytest.raises(Exception, match="clip_fuse groups stacked and unstacked"):
        clip_groups({"blocks": {"query": {"kernel": jnp.zeros((2, 3))}}, "query": {"kernel": jnp.zeros((3,))}},
                    {"blocks": {"query": {"kernel": Axes(("layers", "embed"))}}, "query": {"kernel": Axes(("embed",))}},
                    [r"(blocks/|)query/kernel"])
