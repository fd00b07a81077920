"""White-box analysis: coding rates against closed forms and the float64 reference (docs/math.md §Coding rate), per-layer
measurements of real (tiny, random) CRATE / CRATE-α models, emergent segmentation on synthetic features,
and the `python -m crate_jax.analyze` command end to end."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import reference_np as R
from crate_jax.analysis import coding_rate as cr
from crate_jax.analysis import measure, samples, segmentation
from crate_jax.checkpoint.bundle import params_dict, save_bundle
from crate_jax.models import build_model, model_config


def orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q[:, :cols]


def f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


@functools.cache
def jitted(fn):
    return jax.jit(fn)  # one compile per shape instead of one per eager primitive; ε is traced, not static


def run_in(dtype, fn, *arrays, **scalars):
    """`fn(*arrays, **scalars)` as numpy, with the arrays in `dtype` ('float64' runs under `jax.enable_x64`)."""
    fn = jitted(fn)
    if dtype == "float32":
        return np.asarray(fn(*[f32(a) for a in arrays], **scalars))
    with jax.enable_x64(True):
        out = fn(*[jnp.asarray(np.asarray(a, np.float64)) for a in arrays], **scalars)
        assert out.dtype == jnp.float64
        return np.asarray(out)


REL = {"float32": 2e-6, "float64": 1e-12}


# ---------------------------------------------------------------------------------------------
# Rates against closed forms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_orthogonal_subspaces_closed_form(dtype):
    """Z spanned by orthonormal subspaces with orthogonal token directions: every logdet is a product."""
    rng = np.random.default_rng(0)
    K, p, N, eps = 3, 4, 20, 0.7
    d = K * p
    U = orthonormal(rng, d, d).reshape(d, K, p)  # U_k = U[:, k, :], mutually orthogonal
    Q = orthonormal(rng, N, d)  # N x Kp, orthonormal columns
    s = rng.uniform(0.5, 3.0, size=(K, p))
    Z = sum(Q[:, k * p:(k + 1) * p] @ np.diag(s[k]) @ U[:, k, :].T for k in range(K))  # [N, d]
    want_rc = 0.5 * np.sum(np.log1p(p / (N * eps**2) * s**2))
    want_r = 0.5 * np.sum(np.log1p(d / (N * eps**2) * s**2))
    assert run_in(dtype, cr.compression_rate, Z, U, eps=eps) == pytest.approx(want_rc, rel=REL[dtype])
    assert run_in(dtype, cr.coding_rate, Z, eps=eps) == pytest.approx(want_r, rel=REL[dtype])
    # a subspace orthogonal to the data sees nothing
    V = orthonormal(rng, d + p, d + p)
    Zp = np.concatenate([Z, np.zeros((N, p))], axis=1) @ V.T  # tokens V[:, :d] z: span(V[:, d:]) is unused
    Uo = V[:, d:].reshape(d + p, 1, p)
    assert run_in(dtype, cr.compression_rate, Zp, Uo, eps=eps) == pytest.approx(0.0, abs=10 * REL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N,d", [(10, 24), (40, 12)])  # N < d uses the N x N Gram, N > d the d x d one
def test_rank_deficient_closed_form(N, d, dtype):
    rng = np.random.default_rng(1)
    r, eps = 3, 0.5
    s = np.array([2.0, 1.0, 0.25])
    Z = orthonormal(rng, N, r) @ np.diag(s) @ orthonormal(rng, d, r).T  # rank r
    want = 0.5 * np.sum(np.log1p(d / (N * eps**2) * s**2))
    assert run_in(dtype, cr.coding_rate, Z, eps=eps) == pytest.approx(want, rel=REL[dtype])
    assert run_in(dtype, cr.coding_rate, np.zeros((N, d)), eps=eps) == 0.0


def test_eps_limits():
    rng = np.random.default_rng(2)
    N, d, r = 16, 8, 3
    s = np.array([1.5, 1.0, 0.5])
    Z = orthonormal(rng, N, r) @ np.diag(s) @ orthonormal(rng, d, r).T

    def R64(eps, U=None):
        return float(run_in("float64", cr.coding_rate, Z, eps=eps) if U is None else
                     run_in("float64", cr.compression_rate, Z, U, eps=eps))

    # ε → ∞: R → ½ d/(Nε²) ‖Z‖_F² from below, the gap being the second-order term ¼ (d/(Nε²))² Σ σ⁴
    for eps in (10.0, 1e3):
        a = d / (N * eps**2)
        gap = 0.5 * a * np.sum(Z**2) - R64(eps)
        assert gap == pytest.approx(0.25 * a**2 * np.sum(s**4), rel=2 * a * s.max() ** 2)
    assert R64(1e8) < 1e-15
    # ε → 0: R ≈ ½ Σ_{i≤r} log(d σ_i² / (N ε²)): shrinking ε tenfold adds rank·log(10)
    assert R64(1e-4) - R64(1e-3) == pytest.approx(r * math.log(10.0), rel=1e-6)
    assert R64(1e-4) == pytest.approx(0.5 * np.sum(np.log(d * s**2 / (N * 1e-8))), rel=1e-7)
    # R^c follows the same law per subspace (U = the identity split into 2 blocks): the slope is Σ_k rank(Z U_k)
    U = np.eye(d).reshape(d, 2, 4)
    ranks = sum(np.linalg.matrix_rank(Z @ U[:, k]) for k in range(2))
    # (Z U_k has smaller singular values than Z, so the O(1/(aσ²)) remainder is larger: ~1e-5 relative)
    assert R64(1e-4, U) - R64(1e-3, U) == pytest.approx(ranks * math.log(10.0), rel=3e-5)
    # float32 agrees with float64 where the problem is well conditioned
    assert float(run_in("float32", cr.coding_rate, Z, eps=0.5)) == pytest.approx(R64(0.5), rel=2e-6)


def test_float64_path_survives_ill_conditioning():
    """A low-rank token set with a large norm (a long residual stream) at small ε: the float32 Cholesky loses
    the small pivots, the float64 rates of `rates_from_captures` still match the reference."""
    rng = np.random.default_rng(6)
    N, d, K = 33, 64, 4
    Z = (rng.normal(size=(2, N, 4)) @ rng.normal(size=(4, d)) * 30 + 1e-3 * rng.normal(size=(2, N, d)))
    Z = Z.astype(np.float32)
    U = (rng.normal(size=(1, d, K, d // K)) / 8).astype(np.float32)
    cap = {"z_in": jnp.asarray(Z[None]), "mssa_w": jnp.asarray(np.einsum("bnd,dkp->bnkp", Z, U[0])[None])}
    x64_before = jax.config.jax_enable_x64
    got = measure.rates_from_captures(cap, jnp.asarray(U), paper_eps=0.1)  # precision='float64' by default
    assert jax.config.jax_enable_x64 == x64_before  # the float64 mode is scoped to the call
    Z64 = Z.astype(np.float64)
    want_r = [R.coding_rate(z, 0.1) for z in Z64]
    want_rc = [R.compression_rate(z, [U[0, :, k].astype(np.float64) for k in range(K)], 0.1) for z in Z64]
    np.testing.assert_allclose(got["paper_coding_rate"][0], want_r, rtol=1e-7)  # condition number ~1e10
    np.testing.assert_allclose(got["paper_compression"][0], want_rc, rtol=1e-7)
    f32 = measure.rates_from_captures(cap, jnp.asarray(U), paper_eps=0.1, precision="float32")
    assert not np.allclose(f32["paper_coding_rate"][0], want_r, rtol=1e-4)  # why float64 is the default
    # the official form on these (unit-normalised) projections is well conditioned: float32 is fine
    want_off = R.official_compression(np.transpose(cap["mssa_w"][0], (0, 2, 1, 3)), 0.01)[0]
    assert f32["compression"][0].mean() == pytest.approx(want_off, rel=1e-5)
    assert got["compression"][0].mean() == pytest.approx(want_off, rel=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_official_compression_closed_forms(dtype):
    rel = {"float32": 5e-6, "float64": 1e-12}[dtype]  # float32: a rank-1 Gram with a·N = p/eps_sq = 800
    rng = np.random.default_rng(3)
    B, N, K, p, eps_sq = 2, 6, 3, 8, 0.01
    # every token of a head points the same way (any length): I + a 11ᵀ → R = K/2 log(1 + p/eps_sq)
    direction = rng.normal(size=(1, 1, K, p))
    X = direction * rng.uniform(0.1, 5.0, size=(B, N, 1, 1))
    got = run_in(dtype, cr.official_compression, X, eps_sq=eps_sq)
    np.testing.assert_allclose(got, K / 2 * math.log1p(p / eps_sq), rtol=rel)
    # mutually orthogonal tokens (N <= p), arbitrary lengths: R = K N/2 log(1 + p/(N eps_sq))
    X = np.stack([np.stack([orthonormal(rng, p, N).T for _ in range(K)], axis=1) for _ in range(B)])  # [B, N, K, p]
    X = X * rng.uniform(0.1, 5.0, size=(B, N, K, 1))
    got = run_in(dtype, cr.official_compression, X, eps_sq=eps_sq)
    np.testing.assert_allclose(got, K * N / 2 * math.log1p(p / (N * eps_sq)), rtol=rel)


# ---------------------------------------------------------------------------------------------
# Both forms against the independent float64 reference (tests/reference_np.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,d,K", [(17, 48, 4), (65, 32, 2)])
def test_paper_form_matches_float64_reference(N, d, K):
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(3, N, d)) * rng.uniform(0.2, 3.0, size=(3, 1, d))
    U = rng.normal(size=(d, K, d // K)) / math.sqrt(d)
    for eps in (0.1, 0.5, 2.0):
        got_r = run_in("float32", cr.coding_rate, Z, eps=eps)
        got_rc = run_in("float32", cr.compression_rate, Z, U, eps=eps)
        want_r = [R.coding_rate(z, eps) for z in Z]
        want_rc = [R.compression_rate(z, [U[:, k] for k in range(K)], eps) for z in Z]
        np.testing.assert_allclose(got_r, want_r, rtol=1e-5)
        np.testing.assert_allclose(got_rc, want_rc, rtol=1e-5)


@pytest.mark.parametrize("N,p", [(197, 64), (17, 64)])
def test_official_form_matches_float64_reference(N, p):
    rng = np.random.default_rng(5)
    B, K = 5, 3
    X = rng.normal(size=(B, N, K, p)) + rng.normal(size=(1, 1, K, p))  # correlated tokens, like real ones
    per_sample = run_in("float32", cr.official_compression, X, eps_sq=0.01)
    mean, std = measure.mean_and_std(per_sample, ddof=1)
    want_mean, want_std = R.official_compression(np.transpose(X, (0, 2, 1, 3)), 0.01)
    assert mean == pytest.approx(want_mean, rel=1e-5)
    assert std == pytest.approx(want_std, rel=1e-3)  # a difference of nearby numbers: looser
    assert measure.mean_and_std(per_sample[:1], ddof=1)[1] is None  # torch gives nan for one sample


def test_sparsity_counts():
    Z = np.zeros((3, 5, 4), np.float32)
    Z[0, 0, :3] = 1.0  # 3 non-zeros of 20
    Z[1] = -2.0  # dense
    Z[2, 1, 1] = 1e-30  # tiny but not zero
    np.testing.assert_allclose(np.asarray(cr.zero_fraction(f32(Z))), [17 / 20, 0.0, 19 / 20])
    np.testing.assert_allclose(np.asarray(cr.nonzero_fraction(f32(Z))), [3 / 20, 1.0, 1 / 20])
    want_mean, want_std = R.official_sparsity(Z)
    mean, std = measure.mean_and_std(np.asarray(cr.zero_fraction(f32(Z))), ddof=0)
    assert (mean, std) == pytest.approx((want_mean, want_std), rel=1e-6)
    # leading layer axis
    stacked = np.stack([Z, np.zeros_like(Z)])
    np.testing.assert_allclose(np.asarray(cr.zero_fraction(f32(stacked), batch_axes=2))[1], 1.0)


# ---------------------------------------------------------------------------------------------
# Per-layer measurements of tiny random models against the reference on their own captures
# ---------------------------------------------------------------------------------------------
def tiny_cfg(model, depth=2, **kw):
    """The one tiny config per family used by every test here, so compiled functions are shared (cached)."""
    variant = {"crate": "T/8", "crate_alpha": "Ti/8", "vit": "Ti/8"}[model]
    return model_config(model, variant, image_size=32, depth=depth, num_classes=5, **kw)


@functools.cache
def tiny_model(family):
    """Built once per family (building is the slow part on a busy 2-core machine)."""
    return build_model(tiny_cfg(family), 7)


@functools.cache
def model_captures(family, n=5, seed=0):
    """The model's own captures (`model(x, capture=True)`, jitted as a whole) as float64 numpy."""
    graphdef, state = nnx.split(tiny_model(family))
    caps = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, capture=True)[1])(state, tiny_images(n, seed))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), caps)


def tiny_images(n, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, 32, 32, 3)), np.float32)


@pytest.mark.parametrize("family", ["crate", "crate_alpha"])
def test_measure_model_matches_reference_on_captures(family):
    cfg = tiny_cfg(family)
    model = tiny_model(family)
    x = tiny_images(5)
    # 3 batches, the last one padded: the per-sample comparison below also checks that padding is dropped
    per = measure.measure_per_sample(model, x, batch_size=2, paper_eps=0.5)
    rows = measure.summarize(per)
    caps = model_captures(family)
    U = np.asarray(model.encoder.blocks.mssa.proj.kernel[...], np.float64)  # [depth, d, K, p]
    ln_scale = np.asarray(model.encoder.blocks.ln1.scale[...], np.float64)
    ln_bias = np.asarray(model.encoder.blocks.ln1.bias[...], np.float64)
    K = cfg.num_heads
    for layer, row in enumerate(rows):
        z_in = caps["tokens_in"] if layer == 0 else caps["out"][layer - 1]  # Z^ℓ [B, N+1, d]
        # the captured MSSA input is LN1(Z^ℓ) U^ℓ, so Z^ℓ is the right token set
        w = R.layer_norm(z_in, ln_scale[layer], ln_bias[layer], cfg.ln_eps) @ U[layer].reshape(cfg.width, -1)
        np.testing.assert_allclose(caps["mssa_w"][layer].reshape(w.shape), w, rtol=1e-4, atol=1e-4)
        mean, std = R.official_compression(np.transpose(caps["mssa_w"][layer], (0, 2, 1, 3)), 0.01)
        assert row["compression"] == pytest.approx(mean, rel=1e-5)
        assert row["compression_std"] == pytest.approx(std, rel=1e-2, abs=1e-3)
        zmean, zstd = R.official_sparsity(caps["code"][layer])
        assert row["zero_fraction"] == pytest.approx(zmean, abs=1e-12)
        assert row["zero_fraction_std"] == pytest.approx(zstd, abs=1e-12)
        assert row["sparsity"] == pytest.approx(1.0 - zmean, abs=1e-12)
        assert row["paper_sparsity"] == row["sparsity"]
        want_rc = [R.compression_rate(z, [U[layer][:, k] for k in range(K)], 0.5) for z in z_in]
        want_r = [R.coding_rate(z, 0.5) for z in z_in]
        np.testing.assert_allclose(per["paper_compression"][layer], want_rc, rtol=1e-5)
        np.testing.assert_allclose(per["paper_coding_rate"][layer], want_r, rtol=1e-5)
        assert row["paper_compression"] == pytest.approx(np.mean(want_rc), rel=1e-5)
        assert row["layer"] == layer and row["num_samples"] == 5
    # code widths: CRATE's ISTA output is d wide, CRATE-α's ODL code 4d
    assert caps["code"].shape[-1] == cfg.dict_size
    # the sparse code really is sparse somewhere (ReLU with threshold ηλ)
    assert max(r["zero_fraction"] for r in rows) > 0.05
    # layer selection
    sel = measure.measure_model(model, x, batch_size=2, layers=[-1, 0])
    assert [r["layer"] for r in sel] == [0, 1]
    assert sel[1]["compression"] == pytest.approx(rows[1]["compression"], rel=1e-12)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        measure.measure_model(model, x, layers=[3])


def test_vit_has_sparsity_but_no_compression():
    model = tiny_model("vit")
    rows = measure.measure_model(model, tiny_images(2))
    assert len(rows) == 2
    assert all(r["compression"] is None and r["paper_compression"] is None for r in rows)
    assert all(0.0 <= r["sparsity"] <= 1.0 and r["paper_coding_rate"] > 0 for r in rows)
    attn, feats = measure.attention_and_features(model, tiny_images(2))
    assert attn.shape == (2, 3, 16) and feats.shape == (2, 16, 192)


def test_cls_attention_rows_are_softmax_over_keys():
    model = tiny_model("crate")
    x = tiny_images(5)
    attn, feats = measure.attention_and_features(model, x, layer=1, batch_size=2)
    w = model_captures("crate")["mssa_w"][1]  # [B, N+1, K, p]
    logits = np.einsum("bkp,bnkp->bkn", w[:, 0], w) / math.sqrt(w.shape[-1])
    full = R.softmax(logits, -1)
    np.testing.assert_allclose(attn, full[:, :, 1:], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(feats, w[:, 1:].reshape(5, 16, -1), rtol=1e-5, atol=1e-6)


def test_compare_with_init_uses_fresh_weights():
    out = measure.compare_with_init(tiny_model("crate"), tiny_images(2), seed=0)
    assert set(out) == {"trained", "init"}
    assert out["trained"][0]["compression"] != pytest.approx(out["init"][0]["compression"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------
def two_object_scene(seed, g=14, F=32, noise=0.3, same_features=False):
    """Patch labels [g, g] (0 background, 1 and 2 objects) and features that separate them by construction."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((g, g), int)
    labels[2:7, 2:8] = 1
    labels[8:13, 7:12] = 2
    base = orthonormal(rng, F, 3).T * 3.0  # three orthogonal directions
    if same_features:
        base[2] = base[1]
    feats = base[labels.reshape(-1)] + noise * rng.normal(size=(g * g, F))
    return labels, feats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("same_features", [False, True])
def test_maskcut_recovers_two_objects(seed, same_features):
    labels, feats = two_object_scene(seed, same_features=same_features)
    masks = segmentation.maskcut(feats, num_objects=3, tau=0.2)
    assert 2 <= len(masks) <= 3
    assert not np.logical_and(masks[0], masks[1]).any()
    for obj in (1, 2):
        best = max(segmentation.iou(m, labels == obj) for m in masks)
        assert best >= 0.8, (obj, best)
    # the first two cuts are the two objects (the background is never taken first)
    ious = sorted(max(segmentation.iou(m, labels == o) for o in (1, 2)) for m in masks[:2])
    assert ious[0] >= 0.8
    # pixel masks line up with the patches
    up = segmentation.upsample(masks[0], 8)
    assert up.shape == (112, 112) and up.sum() == masks[0].sum() * 64


def test_threshold_attention_keeps_the_mass():
    attn = np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    m = segmentation.threshold_attention(attn, mass=0.6)
    np.testing.assert_array_equal(m[0], [True, True, False, False])  # 0.5 < 0.6 → add the 0.3 patch
    assert m[1].sum() == 3  # 0.25, 0.5 < 0.6 → third patch crosses it
    assert segmentation.threshold_attention(attn, mass=1.0).all()
    # on an attention map concentrated on an object, the mask is the object
    labels, _ = two_object_scene(0)
    obj = (labels == 1).reshape(-1)
    a = np.where(obj, 1.0, 0.01)[None]
    # the object holds 30 / 31.66 of the mass: any mass in (29, 30] / 31.66 keeps exactly the object
    np.testing.assert_array_equal(segmentation.threshold_attention(a, 0.93)[0], obj)


def test_pca_rgb_separates_clusters():
    labels, feats = two_object_scene(0)
    rgb = segmentation.pca_rgb(feats)
    assert rgb.shape == (14, 14, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    means = [rgb[labels == k].mean(0) for k in range(3)]
    spread = max(rgb[labels == k].std(0).max() for k in range(3))
    gaps = [np.abs(means[i] - means[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 2 * spread


# ---------------------------------------------------------------------------------------------
# Samples and the command
# ---------------------------------------------------------------------------------------------
def test_load_images_sources(tmp_path):
    ims = samples.load_images("skimage-objects", 32, max_images=2)
    assert ims.names == ("astronaut", "cat") and ims.display.shape == (2, 32, 32, 3)
    assert ims.display.dtype == np.uint8 and ims.normalized.dtype == np.float32
    np.testing.assert_allclose(ims.normalized, (ims.display / 255.0 - samples.IMAGENET_MEAN) / samples.IMAGENET_STD,
                               rtol=1e-5, atol=1e-5)
    # a non-square image is resized on its short side and centre-cropped
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the centre third is white
    np.save(tmp_path / "a.npy", wide)
    out = samples.load_images(tmp_path / "a.npy", 16)
    assert out.names == ("a_0",) and out.display.shape == (1, 16, 16, 3) and out.display.min() > 200
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(folder / "grey.png")  # grey → RGB
    out = samples.load_images(folder, 16)
    assert out.names == ("grey",) and (out.display == 7).all()


def make_bundle(tmp_path, family):
    cfg = tiny_cfg(family)
    path = tmp_path / f"ckpt_{family}"
    save_bundle(path, cfg, params_dict(tiny_model(family)))
    return path, cfg


@pytest.mark.parametrize("family", ["crate", "crate_alpha"])
def test_analyze_command_writes_every_file(tmp_path, family, capsys):
    from crate_jax import analyze

    ckpt, cfg = make_bundle(tmp_path, family)
    if family == "crate":
        source = "skimage-objects"
    else:
        source = tmp_path / "imgs.npy"
        np.save(source, np.random.default_rng(0).integers(0, 256, size=(3, 40, 50, 3), dtype=np.uint8))
    out = tmp_path / "out"
    plotted = 2 if family == "crate" else 1  # matplotlib is the slow part
    rc = analyze.main(["--checkpoint", str(ckpt), "--images", str(source), "--out", str(out), "--max-images", "3",
                       "--batch-size", "2", "--max-plots", str(plotted), "--compare-init", "--init-seed", "5"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "analysis.json").read_text())
    assert isinstance(rows, list) and [r["layer"] for r in rows] == list(range(cfg.depth))
    for r in rows:
        for key in ("compression", "compression_std", "sparsity", "sparsity_std", "zero_fraction",
                    "paper_compression", "paper_coding_rate", "paper_sparsity"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["sparsity"] + r["zero_fraction"] == pytest.approx(1.0)
    assert len(json.loads((out / "analysis_init.json").read_text())) == cfg.depth
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 3 and meta["official_eps_sq"] == 0.01
    pngs = [out / "rate_reduction.png"]
    names = meta["image_names"][:plotted]
    for name in names:
        for f in ("attention.png", "pca.png", "threshold.png", "maskcut.png"):
            pngs.append(out / "images" / name / f)
        masks = np.load(out / "images" / name / "masks.npz")
        assert masks["threshold"].shape == (cfg.num_heads, cfg.grid, cfg.grid)
        assert masks["maskcut"].shape[1:] == (cfg.grid, cfg.grid)
    for png in pngs:
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 200, png
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)  # --max-plots
    assert "compression" in capsys.readouterr().out


def test_analyze_command_errors(tmp_path, capsys):
    from crate_jax import analyze

    def err(*argv):
        rc = analyze.main(list(argv))
        assert rc == 2
        return capsys.readouterr().err

    out = str(tmp_path / "out")
    assert "does not exist" in err("--checkpoint", str(tmp_path / "nope"), "--images", "skimage", "--out", out)
    ckpt, _ = make_bundle(tmp_path, "crate")
    msg = err("--checkpoint", str(ckpt), "--images", "kittens", "--out", out)
    assert "unknown sample set 'kittens'" in msg and "skimage-objects" in msg
    (tmp_path / "empty").mkdir()
    assert "holds no images" in err("--checkpoint", str(ckpt), "--images", str(tmp_path / "empty"), "--out", out)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 32, 32), np.uint8))  # NCHW
    assert "channels" in err("--checkpoint", str(ckpt), "--images", str(tmp_path / "bad.npy"), "--out", out)
    np.save(tmp_path / "flat.npy", np.zeros((5,), np.uint8))
    assert "expected images" in err("--checkpoint", str(ckpt), "--images", str(tmp_path / "flat.npy"), "--out", out)
    np.save(tmp_path / "hot.npy", np.full((1, 8, 8, 3), 3.0, np.float32))
    assert "[0, 1]" in err("--checkpoint", str(ckpt), "--images", str(tmp_path / "hot.npy"), "--out", out)
    assert "layer 9 does not exist" in err("--checkpoint", str(ckpt), "--images", "skimage", "--out", out,
                                           "--layers", "0,9")
    assert not (tmp_path / "out").exists()  # nothing written on a bad input
