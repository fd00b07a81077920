"""One load / save path for every model kind: crate_jax.load / crate_jax.save round trips, self-describing
bundles, Hugging Face-style export, predict on image files and text, old bundles, the padded batch loop."""

import json
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

import crate_jax
from crate_jax import export, predict
from crate_jax.checkpoint import models
from crate_jax.checkpoint.bundle import params_dict, save_bundle
from crate_jax.models import model_config, registry
from crate_jax.models.batch_apply import apply_in_batches
from crate_jax.models.lm import lm_config
from crate_jax.models.mae import mae_config
from crate_jax.models.self_distill import self_distill_config
from crate_jax.models.text import text_config
from crate_jax.models.two_tower import two_tower_config


def tiny(kind):
    if kind == "classifier":
        return model_config("crate_alpha", "Ti/8", image_size=16, width=16, depth=1, num_heads=2, num_classes=3)
    if kind == "crate":
        return model_config("crate", "T/8", image_size=16, width=16, depth=1, num_heads=2, num_classes=3)
    if kind == "two_tower":
        return two_tower_config("crate_alpha", "Ti/8", image_size=16, out_dim=8, image_overrides=dict(
            width=16, depth=1, num_heads=2), text=text_config("mu", width=16, depth=1, num_heads=2, mlp_dim=32,
                                                              vocab_size=64, max_len=6))
    if kind in ("crate_gpt", "gpt2"):
        return lm_config(kind, "small", width=16, depth=1, num_heads=2, vocab_size=40, vocab_multiple=8, block_size=8)
    if kind == "crate_mae":
        return mae_config("T/8", image_size=16, width=16, depth=1, num_heads=2)
    if kind == "self_distill":
        return self_distill_config("crate_alpha", "Ti/8", image_size=16, width=16, depth=1, num_heads=2, head_hidden=16,
                                   head_dim=8, head_layers=2)
    raise KeyError(kind)


KINDS = ["classifier", "crate", "two_tower", "crate_gpt", "gpt2", "crate_mae", "self_distill"]


def assert_same_params(a, b):
    ta, tb = jax.tree.map(np.asarray, params_dict(a)), jax.tree.map(np.asarray, params_dict(b))
    assert jax.tree.structure(ta) == jax.tree.structure(tb)
    for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_through_save_load_and_hf(kind, tmp_path):
    cfg = tiny(kind)
    model = registry.build(cfg, 1)
    crate_jax.save(model, cfg, tmp_path / "b", card={"license": "MIT"})
    for name in ("model.json", "preprocess.json", "README.md"):
        assert (tmp_path / "b" / name).is_file(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error", models.BundleWarning)  # a new bundle is complete: no warning
        cfg2, model2 = crate_jax.load(tmp_path / "b")
    assert cfg2 == cfg
    assert_same_params(model, model2)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "MIT" in card and f"{sum(np.asarray(x).size for x in jax.tree.leaves(params_dict(model))):,}" in card
    pre = json.loads((tmp_path / "b" / "preprocess.json").read_text())
    assert pre["inputs"] == registry.inputs_of(cfg)
    if registry.image_config(cfg) is not None:
        assert pre["image"]["size"] == 16 and pre["image"]["mean"] == [0.485, 0.456, 0.406]
    # Hugging Face-style directory, through the CLI, back bit for bit
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == ("gpt2" if kind == "gpt2" else "crate_jax")
    cfg3, model3 = crate_jax.load_hf(tmp_path / "hf")
    assert cfg3 == cfg
    assert_same_params(model, model3)
    if kind in ("classifier", "crate_gpt"):  # identical outputs, not only identical parameters
        x = (np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32) if kind == "classifier"
             else np.arange(12, dtype=np.int32).reshape(2, 6) % cfg.vocab_size)
        np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model2(x)))
        np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model3(x)))


def test_gpt2_hf_export_reads_with_the_gpt2_hf_importer(tmp_path):
    from crate_jax import convert
    cfg = lm_config("gpt2", "small", width=16, depth=2, num_heads=2, vocab_size=48, block_size=8)
    model = registry.build(cfg, 3)
    crate_jax.save(model, cfg, tmp_path / "b")
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["vocab_size"]) == (16, 2, 2, 48)
    names = set(models.hf.read_safetensors(tmp_path / "hf" / "model.safetensors"))
    assert "transformer.h.1.attn.c_attn.weight" in names and "lm_head.weight" not in names
    assert convert.main(["--format", "gpt2-hf", "--input", str(tmp_path / "hf" / "model.safetensors"), "--heads", "2",
                         "--output", str(tmp_path / "back")]) == 0
    _, back = crate_jax.load(tmp_path / "back")
    assert_same_params(model, back)
    assert "converted with: `python -m crate_jax.convert" in (tmp_path / "back" / "README.md").read_text()


def test_simdino_teacher_and_backbone_from_a_bundle_and_kind_checks(tmp_path):
    cfg = tiny("self_distill")
    model = registry.build(cfg, 2)
    crate_jax.save(model, cfg, tmp_path / "sd")
    bcfg, bmodel = crate_jax.load(tmp_path / "sd", backbone=True, kind="classifier")
    assert registry.kind_of(bcfg) == "classifier" and bcfg.num_classes == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params_dict(bmodel)),
                 jax.tree.map(np.asarray, params_dict(model)["backbone"]))
    with pytest.raises(models.KindError, match="'self_distill' model; this needs 'lm'"):
        crate_jax.load(tmp_path / "sd", kind="lm")
    with pytest.raises(models.BundleError, match="not a model crate_jax can load"):
        crate_jax.load(tmp_path)


def test_old_format_bundle_loads_with_a_warning(tmp_path):
    cfg = tiny("classifier")
    model = registry.build(cfg, 0)
    save_bundle(tmp_path / "old", cfg, jax.tree.map(np.asarray, params_dict(model)))  # model.json + params/ only
    with pytest.warns(models.BundleWarning, match="preprocess.json and README.md"):
        _, loaded = crate_jax.load(tmp_path / "old")
    assert_same_params(model, loaded)


def _images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "one.jpg")
    return folder, tmp_path / "one.jpg"


def test_predict_on_image_files_writes_class_names_and_probabilities(tmp_path):
    cfg = tiny("classifier")
    model = registry.build(cfg, 0)
    crate_jax.save(model, cfg, tmp_path / "b", class_names=["cat", "dog", "fish"])
    folder, jpg = _images(tmp_path)
    out = tmp_path / "top.json"
    assert predict.main(["--checkpoint", str(tmp_path / "b"), "--images", str(folder), "--output", str(out),
                         "--top-k", "2"]) == 0
    preds = json.loads(out.read_text())["predictions"]
    assert [p["input"] for p in preds] == ["img0.png", "img1.png", "img2.png"]
    for p in preds:
        assert len(p["top_k"]) == 2 and {e["label"] for e in p["top_k"]} <= {"cat", "dog", "fish"}
        assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] > 0
        probs = np.exp(np.asarray(p["logits"]) - max(p["logits"]))
        np.testing.assert_allclose(p["top_k"][0]["probability"], probs.max() / probs.sum(), rtol=1e-5)
    # the same preprocessing by hand: short side to round(16 / 0.875) = 18, centre crop 16, ImageNet mean / std
    from crate_jax.data.images.augment import EvalPreprocess
    x = EvalPreprocess(16, 18)(Image.open(folder / "img0.png").convert("RGB")).astype(np.float32) / 255
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(preds[0]["logits"], np.asarray(model(x[None]))[0], rtol=1e-4, atol=1e-5)
    # a single JPEG, CSV table, and logits .npy with a separate table
    assert predict.main(["--checkpoint", str(tmp_path / "b"), "--images", str(jpg), "--output",
                         str(tmp_path / "one.csv")]) == 0
    rows = (tmp_path / "one.csv").read_text().splitlines()
    assert rows[0] == "input,rank,index,label,probability,logit" and len(rows) == 1 + 3
    assert rows[1].split(",")[0] == "one.jpg" and rows[1].split(",")[3] in ("cat", "dog", "fish")
    assert predict.main(["--checkpoint", str(tmp_path / "b"), "--images", str(jpg), "--output",
                         str(tmp_path / "l.npy"), "--top-k-output", str(tmp_path / "t.json")]) == 0
    assert np.load(tmp_path / "l.npy").shape == (1, 3) and (tmp_path / "t.json").is_file()


def test_predict_text_with_the_bundles_tokenizer(tmp_path):
    from crate_jax.text.bpe import train_bpe
    tok = train_bpe(["the cat sat on the mat", "the dog sat on the log"] * 20, vocab_size=300, min_frequency=1)
    tok.save(tmp_path / "tokenizer.json")
    cfg = lm_config("crate_gpt", "small", width=16, depth=1, num_heads=2, vocab_size=tok.vocab_size, block_size=16)
    crate_jax.save(registry.build(cfg, 0), cfg, tmp_path / "lm", tokenizer=tmp_path / "tokenizer.json")
    pre = json.loads((tmp_path / "lm" / "preprocess.json").read_text())
    assert pre["text"]["tokenizer"] == ["tokenizer.json"] and pre["text"]["max_length"] == 16
    assert predict.main(["--checkpoint", str(tmp_path / "lm"), "--text", "the cat sat", "--output",
                         str(tmp_path / "next.json"), "--top-k", "3"]) == 0
    pred = json.loads((tmp_path / "next.json").read_text())["predictions"][0]
    assert pred["input"] == "the cat sat" and len(pred["top_k"]) == 3 and len(pred["logits"]) == tok.vocab_size
    assert all(isinstance(e["label"], str) for e in pred["top_k"])
    assert predict.main(["--checkpoint", str(tmp_path / "lm"), "--text", "the dog", "--output",
                         str(tmp_path / "l.npy")]) == 0
    assert np.load(tmp_path / "l.npy").shape == (1, len(tok.encode("the dog")), tok.vocab_size)


def test_apply_in_batches_pads_and_drops():
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return x * 2 + y, x.sum(axis=1)

    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    a, b = apply_in_batches(fn, [x, np.ones((7, 2), np.float32)], 3)
    np.testing.assert_array_equal(a, x * 2 + 1)
    np.testing.assert_array_equal(b, x.sum(axis=1))
    assert calls == [(3, 2)] * 3  # one shape: the last batch padded


# ------------------------------------------------------------------------------------------------------------
# A training workdir
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from crate_jax.train.loop import train_and_evaluate
    from train_helpers import tiny_config
    wd = tmp_path_factory.mktemp("train") / "wd"
    train_and_evaluate(tiny_config(total_steps=4, **{"mesh.num_devices": 1}), wd)
    return wd


def test_load_a_training_workdir_with_and_without_step(workdir):
    from crate_jax.checkpoint.params import read_params
    cfg, newest = crate_jax.load(workdir)
    assert registry.kind_of(cfg) == "classifier"
    jax.tree.map(np.testing.assert_array_equal, read_params(workdir), jax.tree.map(np.asarray, params_dict(newest)))
    _, step2 = crate_jax.load(workdir, step=2)
    jax.tree.map(np.testing.assert_array_equal, read_params(workdir, 2), jax.tree.map(np.asarray, params_dict(step2)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_dict(newest)),
                                                        jax.tree.leaves(params_dict(step2))))
    with pytest.raises(models.BundleError, match="step 3"):
        crate_jax.load(workdir, step=3)


def test_export_bundle_from_a_run_describes_itself(workdir, tmp_path, monkeypatch):
    import os
    monkeypatch.chdir(workdir.parent)
    out = tmp_path / "digits"
    assert export.main(["--checkpoint", workdir.name, "--format", "bundle", "--output", str(out),
                        "--license", "CC-BY-4.0"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"] == workdir.name and not os.path.isabs(meta["source"])  # as given, never made absolute
    assert json.loads((out / "class_names.json").read_text()) == [str(i) for i in range(10)]
    cfg, model = crate_jax.load(out)
    pre = json.loads((out / "preprocess.json").read_text())["image"]
    assert pre["size"] == cfg.image_size and pre["layout"] == "NHWC"
    card = (out / "README.md").read_text()
    assert "CC-BY-4.0" in card and "steps: 4" in card and "digits" in card and "| train/loss |" in card
    _, trained = crate_jax.load(workdir)
    assert_same_params(trained, model)
