"""Numerical parity: our float32 models vs the float64 numpy reference (tests/reference_np.py).

Random official-layout weights with randomised LayerNorm scales and biases go through our import
path; logits must agree with the reference to 1e-5 relative (L2 norm and max-abs). The reference
is fed the same float32- (or bfloat16-) rounded weights, so the comparison measures the forward
pass only. The end-to-end cases write a real file of each supported type and go through the
`convert` and `predict` command lines.
"""

import ml_dtypes
import numpy as np
import pytest

import reference_np as R
from crate_jax import convert, predict
from crate_jax.weights import importer
from crate_jax.checkpoint.bundle import load_bundle, model_from_params as bundle_model_from_params

DIM, DEPTH, HEADS, PATCH, SIZE, CLASSES = 32, 2, 4, 8, 32, 10
TOL = 1e-5


def rel_errors(ours, ref):
    """(L2 relative error, max-abs error / max-abs reference)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return (float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
            float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))))


def assert_parity(ours, ref, what):
    l2, mx = rel_errors(ours, ref)
    print(f"parity {what}: rel L2 {l2:.2e}, rel max-abs {mx:.2e}")
    assert l2 <= TOL and mx <= TOL, f"{what}: rel L2 {l2:.2e}, rel max-abs {mx:.2e} (tolerance {TOL})"
    # the check is not vacuous: logits are O(1) and differ between images
    assert np.std(ref) > 0.1


def images_nchw(n=3, size=SIZE, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def as_f32(tree):
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def crate_sd(seed=0):
    return as_f32(R.random_crate_state_dict(seed, dim=DIM, depth=DEPTH, heads=HEADS, patch=PATCH, image_size=SIZE,
                                            num_classes=CLASSES))


def alpha_jax(seed=0, posemb="learn", bias=True):
    return as_f32(R.random_crate_alpha_jax(seed, dim=DIM, depth=DEPTH, heads=HEADS, patch=PATCH, image_size=SIZE,
                                           num_classes=CLASSES, posemb=posemb, bias=bias))


def ours_logits(fmt, tensors, x_nchw, **overrides):
    cfg, params = importer.import_tensors(fmt, tensors, **overrides)
    model = bundle_model_from_params(cfg, params)
    return predict.predict_logits(model, x_nchw, layout="NCHW")


# ------------------------------------------------------------------------------------------------
# Model parity per family (in-memory import)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_crate_parity(pool):
    sd, x = crate_sd(), images_nchw()
    ref = R.crate_forward(sd, x, patch=PATCH, heads=HEADS, pool=pool)
    assert_parity(ours_logits("crate-torch", sd, x, num_heads=HEADS, pool=pool), ref, f"CRATE pool={pool}")


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_crate_alpha_parity(posemb):
    params, x = alpha_jax(posemb=posemb), images_nchw()
    ref = R.crate_alpha_forward_jax(params, x.transpose(0, 2, 3, 1), patch=PATCH, heads=HEADS, posemb=posemb,
                                    ln_eps=1e-6, final_eps=1e-6)
    ours = ours_logits("crate-alpha-jax", params, x, image_size=SIZE)
    assert_parity(ours, ref, f"CRATE-alpha posemb={posemb}")


def test_pool_mean_changes_the_crate_logits():
    # guards the two parity cases above against a pool option that is silently ignored
    sd, x = crate_sd(), images_nchw()
    a = R.crate_forward(sd, x, patch=PATCH, heads=HEADS, pool="cls")
    b = R.crate_forward(sd, x, patch=PATCH, heads=HEADS, pool="mean")
    assert rel_errors(a, b)[0] > 1e-2


# ------------------------------------------------------------------------------------------------
# Every import path end to end: file on disk -> convert CLI -> bundle -> predict CLI -> logits
# ------------------------------------------------------------------------------------------------
def _save_torch(path, tensors, wrap=False, prefix=""):
    torch = pytest.importorskip("torch")
    sd = {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    torch.save({"state_dict": sd, "epoch": 3} if wrap else sd, path)


def _save_safetensors(path, tensors):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _save_npz(path, tensors, prefix="", training_extras=False, bf16=False):
    out = {}
    for k, v in tensors.items():
        if bf16:  # big_vision writes bfloat16 as 2-byte void
            v = np.asarray(v, ml_dtypes.bfloat16).view("V2")
        out[prefix + k] = v
    if training_extras:
        out["opt/0/mu/cls"] = np.zeros((1, 1, DIM), np.float32)
        out["chrono/accum_train_time"] = np.float64(12.5)
    np.savez(path, **out)


def _bf16_round(tensors):
    return {k: np.asarray(np.asarray(v, ml_dtypes.bfloat16), np.float32) for k, v in tensors.items()}


def _crate_case(kind):
    sd = crate_sd(seed=3)
    ref = lambda x: R.crate_forward(sd, x, patch=PATCH, heads=HEADS, pool="mean")
    if kind == "pth":  # training checkpoint: {'state_dict': ...} with DDP 'module.' names
        return "w.pth", lambda p: _save_torch(p, sd, wrap=True, prefix="module."), ref, ["--pool", "mean"]
    return "w.safetensors", lambda p: _save_safetensors(p, sd), ref, ["--pool", "mean"]


def _alpha_torch_case(kind):
    sd = as_f32(R.crate_alpha_torch_from_jax(alpha_jax(seed=4), HEADS))
    ref = lambda x: R.crate_alpha_forward_torch(sd, x, patch=PATCH, heads=HEADS, final_eps=1e-5)
    if kind == "pth":
        return "w.pth", lambda p: _save_torch(p, sd), ref, []
    return "w.safetensors", lambda p: _save_safetensors(p, sd), ref, []


def _alpha_jax_case(kind):
    posemb, bias = ("sincos2d", False) if kind == "safetensors-sincos-nobias" else ("learn", True)
    params = alpha_jax(seed=5, posemb=posemb, bias=bias)
    ref_params = _bf16_round(params) if kind == "npz-bf16" else params
    ref = lambda x: R.crate_alpha_forward_jax(ref_params, x.transpose(0, 2, 3, 1), patch=PATCH, heads=HEADS,
                                              posemb=posemb, ln_eps=1e-6, final_eps=1e-6)
    writers = {
        "npz-params-prefix": ("w.npz", lambda p: _save_npz(p, params, "params/", training_extras=True)),
        "npz-bare": ("w.npz", lambda p: _save_npz(p, params)),
        "npz-bf16": ("w.npz", lambda p: _save_npz(p, params, "params/", bf16=True)),
        "safetensors-sincos-nobias": ("w.safetensors", lambda p: _save_safetensors(p, params)),
    }
    name, write = writers[kind]
    return name, write, ref, (["--image-size", str(SIZE)] if posemb == "sincos2d" else [])


CASES = [("crate-torch", _crate_case, "pth"), ("crate-torch", _crate_case, "safetensors"),
         ("crate-alpha-torch", _alpha_torch_case, "pth"), ("crate-alpha-torch", _alpha_torch_case, "safetensors"),
         ("crate-alpha-jax", _alpha_jax_case, "npz-params-prefix"), ("crate-alpha-jax", _alpha_jax_case, "npz-bare"),
         ("crate-alpha-jax", _alpha_jax_case, "npz-bf16"),
         ("crate-alpha-jax", _alpha_jax_case, "safetensors-sincos-nobias")]


@pytest.mark.parametrize("fmt,case,kind", CASES, ids=[f"{f}-{k}" for f, _, k in CASES])
def test_import_path_end_to_end(tmp_path, fmt, case, kind):
    name, write, ref_fn, extra = case(kind)
    write(tmp_path / name)
    bundle = tmp_path / "bundle"
    assert convert.main(["--format", fmt, "--input", str(tmp_path / name), "--output", str(bundle),
                         "--heads", str(HEADS)] + extra) == 0
    cfg, _ = load_bundle(bundle)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.image_size, cfg.num_classes) == \
        (DIM, DEPTH, HEADS, PATCH, SIZE, CLASSES)
    x = images_nchw(n=5, seed=7)
    np.save(tmp_path / "x.npy", x)
    # batch size 2 over 5 images: exercises the padded last batch
    assert predict.main(["--checkpoint", str(bundle), "--images", str(tmp_path / "x.npy"), "--layout", "NCHW",
                         "--output", str(tmp_path / "logits.npy"), "--batch-size", "2"]) == 0
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32
    assert_parity(logits, ref_fn(x), f"{fmt} {kind}")
