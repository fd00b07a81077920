"""Weight import / export / predict: variant inference, error reporting, bit-exact round trips.

Numerical agreement with the reference lives in test_parity.py; here the checks are about names,
shapes, bits, files and messages. Real sizes are checked from shapes alone (zero-stride arrays).
"""

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

import reference_np as R
from crate_jax import convert, export, predict
from crate_jax.checkpoint.bundle import save_bundle
from crate_jax.models import abstract_model, count_params
from crate_jax.weights import WeightsError, check_layout, expected_shapes, importer, infer_config, read_tensors

DIM, DEPTH, HEADS, PATCH, SIZE, CLASSES = 32, 2, 4, 8, 32, 10


def as_f32(tree):
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def crate_sd(seed=0):
    return as_f32(R.random_crate_state_dict(seed, dim=DIM, depth=DEPTH, heads=HEADS, patch=PATCH, image_size=SIZE,
                                            num_classes=CLASSES))


def alpha_jax(seed=0, **kw):
    return as_f32(R.random_crate_alpha_jax(seed, dim=DIM, depth=DEPTH, heads=HEADS, patch=PATCH, image_size=SIZE,
                                           num_classes=CLASSES, **kw))


def alpha_torch(seed=0):
    return as_f32(R.crate_alpha_torch_from_jax(alpha_jax(seed), HEADS))


def zeros_like_shapes(shapes):
    """Full-size tensors that take no memory: a broadcast scalar per name."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def save_safetensors(path, tensors):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------
# Variant inference (shapes only, real sizes)
# ------------------------------------------------------------------------------------------------
REAL = [
    # fmt, shapes, expected variant, image size, param count (docs/math.md §Sizes, §CLIPA)
    ("crate-torch", lambda: R.random_crate_state_dict(0, dim=384, depth=12, heads=6, patch=16, image_size=224,
                                                      num_classes=1000, shapes_only=True), "T/16", 224, 6_090_856),
    ("crate-torch", lambda: R.random_crate_state_dict(0, dim=1024, depth=24, heads=16, patch=16, image_size=224,
                                                      num_classes=1000, shapes_only=True), "L/16", 224, 77_641_192),
    ("crate-alpha-torch", lambda: {k: np.shape(v) for k, v in R.crate_alpha_torch_from_jax(
        zeros_like_shapes(R.random_crate_alpha_jax(0, dim=768, depth=12, heads=12, patch=16, image_size=224,
                                                   num_classes=1000, shapes_only=True)), 12).items()},
     "B/16", 224, 72_328_936),
    ("crate-alpha-jax", lambda: R.random_crate_alpha_jax(0, dim=1024, depth=24, heads=16, patch=14, image_size=224,
                                                         num_classes=1000, shapes_only=True), "L/14", 224, 253_650_920),
    # CLIPA image tower @84 px: no conv / head bias, 1024-wide projection head (docs/math.md §CLIPA)
    ("crate-alpha-jax", lambda: R.random_crate_alpha_jax(0, dim=1024, depth=24, heads=16, patch=14, image_size=84,
                                                         num_classes=1024, bias=False, shapes_only=True),
     "L/14", 84, 253_448_192),
]


@pytest.mark.parametrize("fmt,shapes,variant,size,n_params", REAL, ids=[f"{r[0]}-{r[2]}@{r[3]}" for r in REAL])
def test_infers_real_variants_from_shapes(fmt, shapes, variant, size, n_params):
    tensors = zeros_like_shapes(shapes())
    cfg = infer_config(fmt, tensors)
    check_layout(fmt, tensors, cfg)
    assert (cfg.variant, cfg.image_size) == (variant, size)
    assert count_params(abstract_model(cfg)) == n_params == sum(np.prod(s) for s in expected_shapes(fmt, cfg).values())
    assert cfg.final_ln_eps == (1e-6 if fmt == "crate-alpha-jax" else 1e-5)
    # --variant naming the same size agrees; leaving out '/P' keeps the kernel's patch size
    assert infer_config(fmt, tensors, variant) == cfg
    assert infer_config(fmt, tensors, variant.split("/")[0]) == cfg


def test_variant_and_heads_overrides():
    tensors = zeros_like_shapes(R.random_crate_state_dict(0, dim=384, depth=12, heads=6, patch=16, image_size=224,
                                                          num_classes=1000, shapes_only=True))
    # the torch layout does not record heads: an override is honoured and the name says "custom"
    cfg = infer_config("crate-torch", tensors, num_heads=12, pool="mean")
    assert (cfg.num_heads, cfg.variant, cfg.pool) == (12, "custom/16", "mean")
    # a variant that does not fit: one error, led by what the file holds
    with pytest.raises(WeightsError) as e:
        importer.import_tensors("crate-torch", tensors, "B/16")
    msg = str(e.value)
    assert msg.startswith("variant B/16 does not fit") and "crate T/16 (width 384" in msg
    assert "to_patch_embedding.2.weight  expected (768, 768), got (384, 768)" in msg


def test_small_sizes_need_heads_and_read_them_from_the_jax_kernel():
    with pytest.raises(WeightsError, match=r"match no crate variant .* pass --heads K"):
        importer.import_tensors("crate-torch", crate_sd())
    cfg, _ = importer.import_tensors("crate-alpha-jax", alpha_jax())
    assert (cfg.num_heads, cfg.width, cfg.depth, cfg.image_size, cfg.variant) == (HEADS, DIM, DEPTH, SIZE, "custom/8")


def test_crate_alpha_jax_optional_parts_are_inferred():
    cfg, params = importer.import_tensors("crate-alpha-jax", alpha_jax(posemb="sincos2d", bias=False), image_size=SIZE)
    assert (cfg.posemb, cfg.stem_bias, cfg.head_bias) == ("sincos2d", False, False)
    assert "pos_embedding" not in params and "bias" not in params["embedding"] and "bias" not in params["head"]


# ------------------------------------------------------------------------------------------------
# Bad input: one error listing everything, nothing written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["crate-torch", "crate-alpha-jax"])
def test_bad_tensors_listed_in_one_error_and_nothing_written(tmp_path, capsys, fmt):
    if fmt == "crate-torch":
        t = crate_sd()
        drop, bad = "transformer.layers.1.1.fn.weight", "transformer.layers.0.0.fn.qkv.weight"
    else:
        t = alpha_jax()
        drop = "Transformer/encoderblock_1/OvercompleteISTABlock_0/D1"
        bad = "Transformer/encoderblock_0/LayerNorm_1/scale"
    del t[drop]
    t["extra.weight"] = np.zeros((5,), np.float32)
    t[bad] = np.zeros(t[bad].shape[:-1] + (t[bad].shape[-1] + 1,), np.float32)
    src = save_safetensors(tmp_path / "w.safetensors", t)
    out = tmp_path / "out"
    assert convert.main(["--format", fmt, "--input", str(src), "--output", str(out), "--heads", str(HEADS)]) == 2
    err = capsys.readouterr().err
    assert "missing (1)" in err and drop in err
    assert "unexpected (1)" in err and "extra.weight  got (5,)" in err
    assert "mis-shaped (1)" in err and bad in err
    assert err.count("error:") == 1
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temporary left over


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    src = save_safetensors(tmp_path / "w.safetensors", alpha_jax())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--format", "crate-alpha-jax", "--input", str(src), "--output", str(out)]
    assert convert.main(args) == 2
    assert (out / "keep.txt").read_text() == "mine"
    assert convert.main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"] == "crate-alpha-jax:w.safetensors" and len(meta["source_sha256"]) == 64


def test_wrong_format_is_named(tmp_path):
    src = save_safetensors(tmp_path / "w.safetensors", crate_sd())
    with pytest.raises(WeightsError, match="pass --format crate-torch"):
        importer.import_weights("crate-alpha-jax", src)
    with pytest.raises(WeightsError, match="unknown weight format"):
        importer.import_weights("crate-beta", src)
    with pytest.raises(WeightsError, match="unknown weight file type '.h5'"):
        importer.import_weights("crate-torch", tmp_path / "w.h5")


def test_clipa_two_tower_is_refused_with_a_reason():
    tree = {"img/" + k: v for k, v in alpha_jax().items()}
    tree["t"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError, match="two-tower"):
        importer.import_tensors("crate-alpha-jax", {"params/" + k: v for k, v in tree.items()})


def test_torch_files_need_torch_and_load_weights_only(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(2), "f": os.getcwd}, evil)  # a pickled global: refused by weights_only
    with pytest.raises(WeightsError, match="weights_only"):
        read_tensors(evil)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightsError, match="needs PyTorch"):
        read_tensors(evil)


def test_npz_void_bf16_and_training_keys(tmp_path):
    a = np.random.default_rng(0).standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "c.npz", **{"params/a": a.view("V2"), "opt/a": np.zeros(3), "chrono/t": np.float64(1.0)})
    raw = read_tensors(tmp_path / "c.npz")
    assert raw["params/a"].dtype == ml_dtypes.bfloat16 and bits_equal(raw["params/a"], a)


# ------------------------------------------------------------------------------------------------
# Export: refusals, bit-exact round trips
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Bundles imported from in-memory official weights, plus the weights themselves."""
    root = tmp_path_factory.mktemp("bundles")
    sources = {
        "crate": ("crate-torch", crate_sd(1), dict(num_heads=HEADS, pool="mean")),
        "alpha": ("crate-alpha-torch", alpha_torch(2), dict(num_heads=HEADS)),
        "alpha-sincos": ("crate-alpha-jax", alpha_jax(3, posemb="sincos2d", bias=False), dict(image_size=SIZE)),
    }
    out = {}
    for name, (fmt, tensors, kw) in sources.items():
        cfg, params = importer.import_tensors(fmt, tensors, **kw)
        save_bundle(root / name, cfg, params, source=fmt)
        out[name] = (root / name, fmt, tensors, cfg, params)
    return out


@pytest.mark.parametrize("name,suffix", [("crate", ".pth"), ("crate", ".safetensors"), ("alpha", ".pth"),
                                         ("alpha", ".safetensors")])
def test_torch_import_export_is_bit_exact(tmp_path, bundles, name, suffix):
    if suffix == ".pth":
        pytest.importorskip("torch")
    bundle, fmt, tensors, _, _ = bundles[name]
    out = tmp_path / ("w" + suffix)
    assert export.main(["--checkpoint", str(bundle), "--format", fmt, "--output", str(out)]) == 0
    back = read_tensors(out)
    assert sorted(back) == sorted(tensors)
    bad = [k for k in tensors if not bits_equal(back[k], tensors[k])]
    assert not bad, f"tensors changed by import -> export: {bad}"


@pytest.mark.parametrize("name,fmt,suffix", [("crate", "crate-torch", ".npz"),
                                             ("alpha", "crate-alpha-jax", ".npz"),
                                             ("alpha", "crate-alpha-torch", ".safetensors"),
                                             ("alpha-sincos", "crate-alpha-jax", ".safetensors")])
def test_import_export_import_params_identical(tmp_path, bundles, name, fmt, suffix):
    bundle, _, _, cfg, params = bundles[name]
    out = tmp_path / ("w" + suffix)
    assert export.main(["--checkpoint", str(bundle), "--format", fmt, "--output", str(out)]) == 0
    overrides = dict(num_heads=cfg.num_heads, pool=cfg.pool, image_size=cfg.image_size)
    if fmt == "crate-alpha-jax" and cfg.posemb == "learn":
        overrides["final_ln_eps"] = cfg.final_ln_eps  # exported from torch weights: keep torch's eps
    cfg2, params2 = importer.import_weights(fmt, out, **overrides)
    assert cfg2 == cfg
    flat = lambda p: {"/".join(map(str, k)): v for k, v in _leaves(p)}
    a, b = flat(params), flat(params2)
    assert sorted(a) == sorted(b) and all(bits_equal(a[k], b[k]) for k in a)


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_jax_export_uses_flat_names_and_void_bf16(tmp_path):
    cfg, params = importer.import_tensors("crate-alpha-jax", alpha_jax(4), param_dtype="bfloat16")
    save_bundle(tmp_path / "b", cfg, params)
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "crate-alpha-jax",
                        "--output", str(tmp_path / "w.npz")]) == 0
    with np.load(tmp_path / "w.npz") as z:
        assert "Transformer/encoderblock_1/OvercompleteISTABlock_0/D1" in z.files
        assert z["cls"].dtype.str == "|V2"  # what big_vision writes for bfloat16
    cfg2, params2 = importer.import_weights("crate-alpha-jax", tmp_path / "w.npz", param_dtype="bfloat16")
    assert cfg2 == cfg and bits_equal(params2["encoder"]["blocks"]["odl"]["D"], params["encoder"]["blocks"]["odl"]["D"])
    if "torch" in sys.modules or _has_torch():  # bfloat16 through a torch .pth, both ways
        assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "crate-alpha-torch",
                            "--output", str(tmp_path / "w.pth")]) == 0
        back = read_tensors(tmp_path / "w.pth")
        assert back["conv1.weight"].dtype == ml_dtypes.bfloat16
        cfg3, params3 = importer.import_weights("crate-alpha-torch", tmp_path / "w.pth", param_dtype="bfloat16",
                                               num_heads=HEADS, final_ln_eps=cfg.final_ln_eps)
        assert cfg3 == cfg and all(bits_equal(a, b) for (_, a), (_, b) in zip(_leaves(params), _leaves(params3)))


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_export_refuses_what_the_layout_cannot_express(tmp_path, bundles, capsys):
    sincos = str(bundles["alpha-sincos"][0])
    out = tmp_path / "w.safetensors"
    assert export.main(["--checkpoint", sincos, "--format", "crate-alpha-torch", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "posemb='sincos2d'" in err and "stem_bias=False" in err and "head_bias=False" in err
    assert export.main(["--checkpoint", str(bundles["crate"][0]), "--format", "crate-alpha-torch",
                        "--output", str(out)]) == 2
    assert "it is a crate model" in capsys.readouterr().err
    cfg = bundles["alpha"][3].replace(odl_steps=3)
    with pytest.raises(WeightsError, match="odl_steps=3"):
        export.export_tensors("crate-alpha-jax", cfg, bundles["alpha"][4])
    assert not out.exists() and os.listdir(tmp_path) == []
    # an existing output is not replaced without --overwrite
    out.write_text("mine")
    assert export.main(["--checkpoint", str(bundles["alpha"][0]), "--format", "crate-alpha-torch",
                        "--output", str(out)]) == 2
    assert out.read_text() == "mine"
    # torch -> jax layout: allowed, with a note about the final LayerNorm eps
    assert export.main(["--checkpoint", str(bundles["alpha"][0]), "--format", "crate-alpha-jax",
                        "--output", str(tmp_path / "w.npz")]) == 0
    assert "final LayerNorm uses eps 1e-06, this checkpoint 1e-05" in capsys.readouterr().err


def test_load_for_export_names_a_non_bundle(tmp_path):
    with pytest.raises(Exception, match="not a model crate_jax can load"):
        export.load_params(tmp_path)


# ------------------------------------------------------------------------------------------------
# Predict: resolution handling
# ------------------------------------------------------------------------------------------------
def _predict(tmp_path, bundle, x, layout, *extra):
    np.save(tmp_path / "x.npy", x)
    rc = predict.main(["--checkpoint", str(bundle), "--images", str(tmp_path / "x.npy"), "--layout", layout,
                       "--output", str(tmp_path / "y.npy"), *extra])
    return rc, (np.load(tmp_path / "y.npy") if rc == 0 else None)


def test_predict_refuses_other_sizes_unless_interpolating(tmp_path, bundles, capsys):
    bundle, _, sd, _, _ = bundles["crate"]
    x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
    rc, _ = _predict(tmp_path, bundle, x, "NHWC")
    assert rc == 2 and "images are 48x48 px" in (err := capsys.readouterr().err) and "trained at 32x32 px" in err
    assert not (tmp_path / "y.npy").exists()
    rc, y = _predict(tmp_path, bundle, x, "NHWC", "--interpolate-posemb")
    assert rc == 0 and y.shape == (2, CLASSES)
    sd48 = dict(sd, pos_embedding=R.resample_posemb_2d(sd["pos_embedding"], 6, 6))
    ref = R.crate_forward(sd48, x.transpose(0, 3, 1, 2), patch=PATCH, heads=HEADS, pool="mean")
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


def test_predict_interpolate_regenerates_sincos(tmp_path, bundles):
    bundle, _, params, _, _ = bundles["alpha-sincos"]
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    rc, y = _predict(tmp_path, bundle, x, "NCHW", "--interpolate-posemb")
    ref = R.crate_alpha_forward_jax(params, x.transpose(0, 2, 3, 1), patch=PATCH, heads=HEADS, posemb="sincos2d")
    assert rc == 0 and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


def test_predict_rejects_raw_pixels_and_wrong_layout(tmp_path, bundles, capsys):
    bundle = bundles["alpha"][0]
    rc, _ = _predict(tmp_path, bundle, np.zeros((1, 3, SIZE, SIZE), np.uint8), "NCHW")
    assert rc == 2 and "already normalised" in capsys.readouterr().err
    rc, _ = _predict(tmp_path, bundle, np.zeros((1, 3, SIZE, SIZE), np.float32), "NHWC")
    assert rc == 2 and "check --layout" in capsys.readouterr().err
