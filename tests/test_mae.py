"""CRATE-MAE (docs/math.md §CRATE-MAE): parameter counts, parity with the float64 reference through the importer and
`predict --mask`, the official masking and loss, and import errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference_mae_np as R
from crate_jax import convert, predict
from crate_jax.checkpoint.bundle import load_bundle
from crate_jax.models import registry
from crate_jax.models.mae import MAE_PARAM_COUNTS, mae_config, mae_loss, mae_sincos_2d
from crate_jax.models.masking import mae_random_mask
from crate_jax.weights import crate_mae
from crate_jax.weights.readers import WeightsError

DIM, DEPTH, HEADS, PATCH, SIZE = 32, 2, 4, 8, 32
L = (SIZE // PATCH) ** 2


def count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("variant", ["T", "S", "B", "L"])
def test_parameter_counts_equal_spec(variant):
    model = registry.abstract(mae_config(f"{variant}/16"))
    want = MAE_PARAM_COUNTS[variant]
    total = count(nnx.state(model))
    if variant == "T":
        assert (total, count(nnx.state(model, nnx.Param))) == (11_555_328, 11_404_032) == want
    else:
        assert total == want
    # the two fixed tables are the only non-trainable variables
    assert total - count(nnx.state(model, nnx.Param)) == 2 * (196 + 1) * model.cfg.width


def official_sd(seed=0):
    return {k: np.asarray(v, np.float32) for k, v in R.random_state_dict(seed, dim=DIM, depth=DEPTH, heads=HEADS,
                                                                          patch=PATCH, image_size=SIZE).items()}


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)), float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_parity_through_convert_and_predict_mask(tmp_path):
    import torch
    sd = official_sd()
    path = tmp_path / "crate_mae.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    bundle = tmp_path / "bundle"
    assert convert.main(["--format", "crate-mae-torch", "--input", str(path), "--output", str(bundle),
                         "--heads", str(HEADS)]) == 0
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    noise = rng.random((3, L))
    mask = R.random_masking(noise, 0.75)
    mask[2] = False  # one image with nothing removed
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "m.npy", mask)
    out = tmp_path / "pred.npy"
    assert predict.main(["--checkpoint", str(bundle), "--images", str(tmp_path / "x.npy"), "--layout", "NCHW",
                         "--mask", str(tmp_path / "m.npy"), "--output", str(out)]) == 0
    pred = np.load(out)
    ref = R.forward(sd, images, mask, patch=PATCH, heads=HEADS)
    assert pred.shape == ref.shape == (3, L, PATCH * PATCH * 3)
    l2, mx = rel(pred, ref)
    print(f"CRATE-MAE parity: rel L2 {l2:.2e}, rel max-abs {mx:.2e}")
    assert l2 <= 1e-5 and mx <= 1e-5 and np.std(ref) > 0.1
    # the mask matters (a masked patch changes the prediction of every patch through attention)
    assert not np.allclose(pred[0], R.forward(sd, images[:1], mask[2:3], patch=PATCH, heads=HEADS)[0], atol=1e-3)

    cfg, model = load_bundle(bundle)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.image_size) == (DIM, DEPTH, HEADS, PATCH, SIZE)
    np.testing.assert_allclose(np.asarray(model.decoder_pos_embed[...])[0], sd["decoder_pos_embed"][0], atol=1e-6)
    # the loss on removed patches, with and without norm_pix_loss
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    for norm_pix in (False, True):
        ours = float(mae_loss(jnp.asarray(pred), x, jnp.asarray(mask), patch=PATCH, norm_pix_loss=norm_pix))
        want = R.loss(ref, images, mask, patch=PATCH, norm_pix_loss=norm_pix)
        assert ours == pytest.approx(want, rel=1e-5)
    # bad masks are refused with a message
    np.save(tmp_path / "bad.npy", mask[:, :-1])
    assert predict.main(["--checkpoint", str(bundle), "--images", str(tmp_path / "x.npy"), "--layout", "NCHW",
                         "--mask", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "p2.npy")]) == 2


def test_masking_is_the_official_noise_argsort():
    key = jax.random.key(3)
    mask = np.asarray(mae_random_mask(key, 4, 49, 0.75))
    noise = np.asarray(jax.random.uniform(key, (4, 49)))
    np.testing.assert_array_equal(mask, R.random_masking(noise, 0.75))
    assert (mask.sum(1) == 49 - int(49 * 0.25)).all()


def test_tables_are_the_official_ones_and_other_tables_are_refused():
    np.testing.assert_allclose(mae_sincos_2d(14, 384)[None], R.sincos_table(384, 14), atol=2e-6)
    sd = official_sd()
    sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.01
    del sd["norm.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as e:
        crate_mae.import_tensors(sd, num_heads=HEADS)
    assert "missing (1)" in str(e.value) and "norm.bias" in str(e.value) and "extra.weight" in str(e.value)
    sd["norm.bias"] = np.zeros(DIM, np.float32)
    del sd["extra.weight"]
    with pytest.raises(WeightsError, match="decoder_pos_embed: differs from the official fixed 2-D sincos"):
        crate_mae.import_tensors(sd, num_heads=HEADS)


def test_analytic_flops_match_xla(variant="T/16"):
    """The count MFU is reported against (`mae_forward_flops`) is XLA's count of the forward pass, to 2 %."""
    from crate_jax.models.mae import mae_forward_flops
    cfg = mae_config(variant)
    graphdef, state = nnx.split(registry.abstract(cfg))
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cost = fwd.lower(state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)).cost_analysis()
    assert abs(cost["flops"] / mae_forward_flops(cfg) - 1) < 0.02
