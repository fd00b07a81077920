"""`convert --format simdino-torch / dino-torch`: official DINO / SimDINO checkpoints (random weights in the
official layout) into a headless ViT bundle, checked through `convert` + `predict` against an independent
float64 forward pass (tests/reference_dino_np.py), at the training size and, for local crops, at a smaller one."""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import pytest

import reference_dino_np as R
from crate_jax import convert, predict
from crate_jax.checkpoint import models
from crate_jax.models.self_distill import backbone_features
from crate_jax.weights import dino
from crate_jax.weights.readers import WeightsError

torch = pytest.importorskip("torch")

WIDTH, DEPTH, HEADS, PATCH, GRID = 24, 2, 3, 4, 4


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _save(path, sd, wrap):
    t = {k: torch.tensor(v) for k, v in sd.items()}
    if wrap == "checkpoint":  # main_dino.py's save_dict: DDP student, plain teacher, args pickled beside
        obj = {"student": {f"module.{k if k.startswith('head.') else 'backbone.' + k}": v for k, v in t.items()},
               "teacher": {(k if k.startswith("head.") else f"backbone.{k}"): v for k, v in t.items()},
               "epoch": 3, "args": argparse.Namespace(arch="vit_small", lr=5e-4)}
    else:
        obj = {k: v for k, v in t.items() if not k.startswith("head.")}
    torch.save(obj, path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dino")
    sd = R.random_state_dict(np.random.default_rng(0), width=WIDTH, depth=DEPTH, heads=HEADS, patch=PATCH,
                             grid=GRID, head="dino")
    ck = tmp / "checkpoint.pth"
    _save(ck, sd, "checkpoint")
    bundle = tmp / "bundle"
    assert convert.main(["--format", "dino-torch", "--input", str(ck), "--output", str(bundle),
                         "--heads", str(HEADS)]) == 0
    return tmp, sd, bundle


def test_convert_predict_matches_float64_reference(official):
    tmp, sd, bundle = official
    x = np.random.default_rng(1).standard_normal((3, 3, GRID * PATCH, GRID * PATCH)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    assert predict.main(["--checkpoint", str(bundle), "--images", str(tmp / "x.npy"), "--layout", "NCHW",
                         "--output", str(tmp / "y.npy")]) == 0
    got = np.load(tmp / "y.npy")
    want = R.vit_forward({k: v for k, v in sd.items() if not k.startswith("head.")}, x, HEADS, DEPTH)
    assert got.shape == (3, WIDTH)
    assert _rel(got, want) <= 1e-5


def test_bundle_is_the_dino_flavour(official):
    _, _, bundle = official
    cfg = models.config_of(bundle)
    assert (cfg.model, cfg.num_classes, cfg.init, cfg.gelu, cfg.pos_resize, cfg.ln_eps) == \
        ("vit", 0, "dino", "erf", "dino", 1e-6)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.image_size) == (WIDTH, DEPTH, HEADS, PATCH,
                                                                                      GRID * PATCH)


def test_local_crop_position_table_matches_official_interpolation(official):
    """A local crop (here 2 × 2 patches) goes through the table resampled as `interpolate_pos_encoding` does."""
    tmp, sd, bundle = official
    _, model = models.load(bundle)
    x = np.random.default_rng(2).standard_normal((2, 3, 2 * PATCH, 2 * PATCH)).astype(np.float32)
    got = backbone_features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    want = R.vit_forward({k: v for k, v in sd.items() if not k.startswith("head.")}, x, HEADS, DEPTH)
    assert _rel(got, want) <= 1e-5


def test_student_key_bare_state_dict_and_errors(official, tmp_path):
    _, sd, _ = official
    ck = tmp_path / "ck.pth"
    _save(ck, sd, "checkpoint")
    s = dino.read_state_dict(ck, "student")
    assert "blocks.1.attn.qkv.weight" in s and "head.last_layer.weight_v" in s
    bare = tmp_path / "bare.pth"
    _save(bare, sd, "bare")
    cfg, params = dino.import_dino(bare, num_heads=HEADS)
    np.testing.assert_array_equal(params["encoder"]["blocks"]["attn"]["key"]["kernel"][1],
                                  sd["blocks.1.attn.qkv.weight"][WIDTH:2 * WIDTH].T.reshape(WIDTH, HEADS, -1))
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    _save(bare, broken, "bare")
    with pytest.raises(WeightsError, match="missing blocks.1.mlp.fc2.bias"):
        dino.import_dino(bare, num_heads=HEADS)
    with pytest.raises(WeightsError, match="pass --heads"):
        dino.import_dino(ck)  # width 24 is no ViT size: the heads must be given
