"""Training checkpoint -> params-only inference bundle: dtype, restore onto any mesh, predict, torch layout."""

import json

import jax
import numpy as np
import pytest

from crate_jax import export, predict
from crate_jax.checkpoint.bundle import load_bundle, params_dict
from crate_jax.parallel.mesh import make_mesh
from crate_jax.parallel.sharding import param_shardings
from crate_jax.checkpoint.params import read_params
from crate_jax.train.loop import train_and_evaluate
from train_helpers import tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("train") / "wd"
    train_and_evaluate(tiny_config(total_steps=2, **{"mesh.num_devices": 1}), wd)
    return wd


def test_bundle_from_training_checkpoint_restores_on_any_mesh(workdir, tmp_path):
    out = tmp_path / "bundle"
    assert export.main(["--checkpoint", str(workdir), "--format", "bundle", "--output", str(out)]) == 0
    trained = read_params(workdir)
    cfg, model = load_bundle(out)
    jax.tree.map(np.testing.assert_array_equal, trained, jax.tree.map(np.asarray, params_dict(model)))
    assert not any("opt_state" in p.name for p in out.rglob("*"))
    # onto an 8-device mesh, FSDP + tensor parallel
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, sharded = load_bundle(out, shardings=lambda st: param_shardings(st, mesh))
    D = sharded.encoder.blocks.odl.D[...]
    assert D.sharding.mesh.shape == mesh.shape and len(D.sharding.device_set) == 8
    x = np.random.default_rng(0).normal(size=(4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sharded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_bf16_bundle_and_predict(workdir, tmp_path):
    out = tmp_path / "bf16"
    torch_file = tmp_path / "model.safetensors"
    assert export.main(["--checkpoint", str(workdir), "--format", "bundle", "--output", str(out), "--dtype",
                        "bfloat16", "--torch-safetensors", str(torch_file)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["block"]["param_dtype"] == "bfloat16"
    cfg, model = load_bundle(out)
    assert all(np.asarray(a).dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(params_dict(model)))
    assert torch_file.stat().st_size > 0
    images = np.random.default_rng(1).normal(size=(3, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    assert predict.main(["--checkpoint", str(out), "--images", str(tmp_path / "x.npy"), "--layout", "NHWC",
                         "--output", str(tmp_path / "logits.npy")]) == 0
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (3, cfg.num_classes) and np.isfinite(logits).all()


def test_export_errors(tmp_path):
    assert export.main(["--checkpoint", str(tmp_path), "--format", "bundle", "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_hf_export_of_a_training_run_reads_back_bit_exactly(workdir, tmp_path):
    import crate_jax
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(workdir), "--format", "hf", "--output", str(out), "--dtype",
                        "bfloat16"]) == 0
    for name in ("model.safetensors", "config.json", "preprocess.json", "class_names.json", "README.md"):
        assert (out / name).is_file(), name
    cfg, model = crate_jax.load(out)
    assert cfg.param_dtype == "bfloat16"
    trained = jax.tree.map(lambda a: np.asarray(a).astype(jax.numpy.bfloat16), read_params(workdir))
    loaded = jax.tree.map(np.asarray, params_dict(model))
    assert all(a.dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(loaded))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16)), trained, loaded)
    # an existing output is refused without --overwrite, and nothing is changed
    before = (out / "model.safetensors").read_bytes()
    assert export.main(["--checkpoint", str(workdir), "--format", "hf", "--output", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before
