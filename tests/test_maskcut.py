"""MaskCut as CutLER publishes it (`crate_jax.analysis.cutler`): planted objects in feature grids, the flip
rules, eigenvector sign invariance, the drop rules, CRF on / off; the attention mIoU meter; the synthetic COCO
scenes; and the `segment maskcut` / `attention` commands end to end on a tiny random bundle."""

import json

import numpy as np
import pytest

from crate_jax.analysis import attention_miou as am
from crate_jax.analysis import cutler, densecrf, seg_inputs


def planted(seed, h=20, w=20, d=24, noise=0.3):
    """A feature grid with two block-shaped objects on a background: `(features [h, w, d], labels [h, w])`."""
    rng = np.random.default_rng(seed)
    base = 4.0 * np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # background and objects: orthogonal directions
    labels = np.zeros((h, w), int)
    y0, x0 = rng.integers(1, 4, size=2)
    labels[y0:y0 + 6, x0:x0 + 7] = 1
    y1, x1 = rng.integers(11, 14, size=2)
    labels[y1:y1 + 5, x1:x1 + 6] = 2
    return base[labels] + noise * rng.normal(size=(h, w, d)), labels


@pytest.mark.parametrize("seed", range(5))
def test_maskcut_recovers_two_planted_objects_deterministically(seed):
    feats, labels = planted(seed)
    masks = cutler.maskcut(feats)
    assert 2 <= len(masks) <= 3
    for obj in (1, 2):
        assert max(cutler.mask_iou(m, labels == obj) for m in masks) >= 0.9
    for a in range(len(masks)):  # disjoint
        for b in range(a + 1, len(masks)):
            assert not np.any(masks[a] & masks[b])
    again = cutler.maskcut(feats.copy())
    assert len(again) == len(masks) and all(np.array_equal(a, b) for a, b in zip(masks, again))


def test_flip_rules():
    shape = (4, 4)
    # the seed (largest |x|) is negative: the foreground is the seed's side, whatever the sign
    x = np.full(16, 0.1)
    x[5] = -1.0
    fg, seed = cutler.bipartition(x, shape)
    assert seed == 5 and fg.reshape(-1)[5] and fg.sum() == 1
    # the mean split puts 3 corners (and the seed) in the foreground: CutLER flips it to the other side
    x = np.zeros(16)
    x[[0, 3, 12]] = [1.0, 0.9, 0.8]
    x[[1, 2, 4]] = 0.5
    fg, seed = cutler.bipartition(x, shape)
    assert cutler.corner_count(fg) <= 1 and not fg.reshape(-1)[0] and fg.reshape(-1)[seed]
    # two corners stay foreground
    x = np.zeros(16)
    x[[0, 3]] = 1.0
    fg, _ = cutler.bipartition(x, shape)
    assert cutler.corner_count(fg) == 2


def test_eigenvector_sign_does_not_matter(monkeypatch):
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.normal(size=36)
        fg1, s1 = cutler.bipartition(x, (6, 6))
        fg2, s2 = cutler.bipartition(-x, (6, 6))
        assert s1 == s2 and np.array_equal(fg1, fg2)
    feats, _ = planted(7)
    want = cutler.maskcut(feats)
    solve = cutler.second_eigenvector
    monkeypatch.setattr(cutler, "second_eigenvector", lambda A, solver="auto": -solve(A, solver))
    got = cutler.maskcut(feats)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_eigenvector_solves_the_generalized_problem():
    feats, _ = planted(1, h=8, w=8)
    A = cutler.affinity(feats.reshape(64, -1))
    x = cutler.second_eigenvector(A)
    D = np.diag(A.sum(1))
    lam = x @ (D - A) @ x / (x @ D @ x)
    np.testing.assert_allclose((D - A) @ x, lam * D @ x, atol=1e-8)
    # the normalised-Laplacian route gives the same vector up to scale and sign
    d = A.sum(1)
    L = np.eye(64) - A / np.sqrt(np.outer(d, d))
    y = np.linalg.eigh(L)[1][:, 1] / np.sqrt(d)
    assert abs(np.corrcoef(x, y)[0, 1]) > 1 - 1e-6


@pytest.mark.parametrize("seed", [0, 4])
def test_solvers_agree(seed):
    feats, _ = planted(seed)
    want = cutler.maskcut(feats, solver="eigh")
    for solver in ("lanczos", "jax"):
        got = cutler.maskcut(feats, solver=solver)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)), solver
    with pytest.raises(ValueError, match="solver"):
        cutler.maskcut(feats, solver="arpack")


def test_drop_rules(monkeypatch):
    """From the second round on, a mask covering <= 1 % of the grid or overlapping the previous one by IoU > 0.5
    is dropped; the eigenvectors are planted (indicator vectors) to reach each rule."""
    a, b, tiny = np.zeros((20, 20)), np.zeros((20, 20)), np.zeros((20, 20))
    a[2:8, 2:8], b[12:18, 10:16], tiny[10, 3] = 1.0, 1.0, 1.0
    for rounds, want in (([a, tiny, b], [a, b]), ([a, a, b], [a, b]), ([a, b, tiny], [a, b])):
        vectors = iter(v.reshape(-1) + 1e-3 * np.arange(400) / 400 for v in rounds)
        monkeypatch.setattr(cutler, "second_eigenvector", lambda A, solver="auto": next(vectors))
        got = cutler.maskcut(np.ones((20, 20, 4)), n_masks=3)
        assert [m.astype(int).tolist() for m in got] == [w.astype(int).tolist() for w in want]
    with pytest.raises(ValueError):
        cutler.maskcut(np.zeros((4, 4)))


def circle_scene(size=48):
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - 22) ** 2 + (xx - 26) ** 2 < 13 ** 2
    image = np.where(truth[..., None], np.array([220, 40, 40]), np.array([90, 100, 95])).astype(np.uint8)
    return image, truth


def blocky_features(truth):
    """A 6x6 grid of 8 px patches: one direction for patches mostly inside the object, another outside."""
    inside = truth.reshape(6, 8, 6, 8).mean(axis=(1, 3)) > 0.5
    rng = np.random.default_rng(0)
    return np.where(inside[..., None], [1.0, 0, 0, 0], [0, 1.0, 0, 0]) + 0.05 * rng.normal(size=(6, 6, 4)), inside


def test_crf_off_runs_the_plain_pipeline():
    image, truth = circle_scene()
    feats, inside = blocky_features(truth)
    masks = seg_inputs.maskcut_image(feats.reshape(36, -1), 6, 8, (96, 96), display=image, crf=False)
    assert len(masks) == 1 and masks[0].shape == (96, 96)  # back at the original image's size
    np.testing.assert_array_equal(cutler.resize_mask(masks[0], 48, 48), cutler.upsample(inside, 8))


def test_crf_on_sharpens_a_blocky_mask():
    if not densecrf.available():
        pytest.skip(f"pydensecrf2 is not installed ({densecrf.INSTALL_HINT}); the CRF-off path is tested above")
    image, truth = circle_scene()
    blocky = cutler.upsample(truth.reshape(6, 8, 6, 8).mean(axis=(1, 3)) > 0.5, 8)
    refined = densecrf.refine(image, blocky)
    assert refined is not None
    assert cutler.mask_iou(refined, truth) > cutler.mask_iou(blocky, truth) + 0.05
    assert densecrf.refine(image, np.roll(blocky, 24, axis=1) & ~truth) is None  # moved off the object: discarded


def test_attention_meter():
    target = np.zeros((4, 4), np.uint8)
    target[:2, :2] = 3
    target[3, 3] = 255
    heads = np.zeros((2, 4, 4), bool)
    heads[0, :2, :2] = True
    heads[1, 0, :] = True
    meter = am.MIoUMeter(2)
    meter.add(heads, target)
    r = meter.result()
    # union of heads: 6 px, ground truth 4 px, all inside the union; 1 px ignored
    assert r["fg_iou"] == pytest.approx(4 / 6) and r["bg_iou"] == pytest.approx(9 / 11)
    assert r["head_fg_iou"] == [pytest.approx(1.0), pytest.approx(2 / 6)] and r["best_head_fg_iou"] == 1.0
    attn = np.array([[0.5, 0.3, 0.1, 0.1]])
    np.testing.assert_array_equal(am.head_masks(attn, (2, 2), 0.6), [[[True, True], [False, False]]])


def test_coco_scenes_are_consistent_and_deterministic(tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_util

    from crate_jax.data.images import coco_scenes

    data = coco_scenes.write(tmp_path / "a", num_images=4, image_size=32, seed=3)
    again = coco_scenes.write(tmp_path / "b", num_images=4, image_size=32, seed=3)
    assert data == again
    assert len(data["annotations"]) >= 2 * 4 - 2  # several objects per image (a rare one may be hidden)
    for entry in data["images"]:
        classes = np.asarray(Image.open(tmp_path / "a" / "masks" / entry["file_name"]))
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        drawn = np.zeros_like(classes)
        for a in anns:
            m = mask_util.decode(a["segmentation"]).astype(bool)
            assert m.sum() == a["area"] and not np.any(drawn[m])
            drawn[m] = a["category_id"]
        np.testing.assert_array_equal(drawn, classes)
        assert (Image.open(tmp_path / "a" / "images" / entry["file_name"]).size == (32, 32))


@pytest.fixture(scope="module")
def bundle_and_scenes(tmp_path_factory):
    from crate_jax.checkpoint.bundle import params_dict, save_bundle
    from crate_jax.data.images import coco_scenes
    from crate_jax.models import build_model, model_config

    root = tmp_path_factory.mktemp("seg")
    cfg = model_config("crate_alpha", "Ti/8", image_size=32, depth=2, num_classes=5)
    save_bundle(root / "ckpt", cfg, params_dict(build_model(cfg, 7)))
    coco_scenes.write(root / "scenes", num_images=3, image_size=40, seed=1)
    return root


def test_segment_maskcut_then_score(bundle_and_scenes, capsys):
    from crate_jax import errors, segment

    root = bundle_and_scenes
    ann, preds, metrics = root / "scenes" / "instances.json", root / "preds.json", root / "metrics.json"
    args = ["maskcut", "--checkpoint", str(root / "ckpt"), "--images", str(root / "scenes" / "images"),
            "--annotations", str(ann), "--out", str(preds), "--tau", "0.15", "--n-masks", "3"]
    assert segment.main(args) == 0
    records = json.loads(preds.read_text())
    assert records and {r["image_id"] for r in records} <= {1, 2, 3}
    assert all(r["category_id"] == 1 and r["score"] == 1.0 and r["segmentation"]["size"] == [40, 40] for r in records)
    assert "no CRF" in capsys.readouterr().out
    assert segment.main(args + ["--overwrite"]) == 0
    assert json.loads(preds.read_text()) == records  # deterministic
    assert segment.main(["score", "--annotations", str(ann), "--predictions", str(preds), "--out", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert set(m) == {"segm", "bbox"} and 0.0 <= m["segm"]["AP50"] <= 1.0
    assert errors.run(segment.main, args[:-4] + ["--layer", "5"]) == 2  # no such layer
    assert errors.run(segment.main, ["maskcut", "--checkpoint", str(root / "none"), "--images",
                                     str(root / "scenes" / "images"), "--out", str(root / "p2.json")]) == 2


def test_segment_attention(bundle_and_scenes):
    from crate_jax import segment

    root = bundle_and_scenes
    out = root / "attn.json"
    assert segment.main(["attention", "--checkpoint", str(root / "ckpt"), "--images", str(root / "scenes" / "images"),
                         "--masks", str(root / "scenes" / "masks"), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 3 and m["layer"] == 0 and len(m["head_fg_iou"]) == 3  # penultimate of 2 layers; Ti: 3 heads
    assert 0.0 <= m["miou"] <= 1.0 and m["mass"] == 0.6


def test_segmentation_evaluator(bundle_and_scenes):
    from types import SimpleNamespace

    from ml_collections import ConfigDict

    from crate_jax.checkpoint.bundle import load_bundle
    from crate_jax.errors import ConfigError
    from crate_jax.train import registry

    root = bundle_and_scenes
    cls = registry.evaluator_class("segmentation", "config.evals.seg.type")
    task = SimpleNamespace(config=ConfigDict(dict(eval_every=0)))
    spec = ConfigDict(dict(type="segmentation", annotations=str(root / "scenes" / "instances.json"), max_images=2,
                           masks=str(root / "scenes" / "masks")))
    ev = cls("seg", spec, task, mesh=None)
    _, model = load_bundle(root / "ckpt")
    state = SimpleNamespace(model=lambda params=None: model, extras={})
    m = ev.run(state)
    assert set(m) == {"mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75", "masks_per_image",
                      "attn_miou", "attn_fg_iou", "attn_jaccard", "attn_best_head_fg_iou"}
    assert all(-1.0 <= v <= 1.0 for k, v in m.items() if k != "masks_per_image") and 0 < m["masks_per_image"] <= 3
    assert ev.run(state) == m  # deterministic
    with pytest.raises(ConfigError, match="unknown keys"):
        cls("seg", ConfigDict(dict(spec.to_dict(), taus=0.2)), task, mesh=None)
    with pytest.raises(ConfigError, match="annotations"):
        cls("seg", ConfigDict(dict(type="segmentation", annotations=str(root / "nope.json"))), task, mesh=None)


@pytest.mark.slow
def test_segmentation_evaluator_in_a_training_run(tmp_path):
    """The evaluator on sharded parameters (8 simulated devices), logged like any other."""
    from train_helpers import tiny_config

    from crate_jax.data.images import coco_scenes
    from crate_jax.train.loop import train_and_evaluate

    coco_scenes.write(tmp_path / "scenes", num_images=2, image_size=32, seed=0)
    c = tiny_config()
    c.evals.seg = dict(type="segmentation", annotations=str(tmp_path / "scenes" / "instances.json"))
    train_and_evaluate(c, tmp_path / "wd")
    rows = [json.loads(line) for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    seg = [r for r in rows if "eval/seg/mask_AP" in r]
    assert len(seg) == 1 and 0.0 <= seg[0]["eval/seg/box_AP50"] <= 1.0 and seg[0]["eval/seg/masks_per_image"] > 0


def test_segment_maskcut_crf_flag(bundle_and_scenes, monkeypatch, capsys):
    """`--crf` without pydensecrf2 runs the plain cuts and says "no CRF"; with it, the masks are refined."""
    from crate_jax import segment

    root = bundle_and_scenes
    base = ["maskcut", "--checkpoint", str(root / "ckpt"), "--images", str(root / "scenes" / "images"),
            "--annotations", str(root / "scenes" / "instances.json"), "--max-images", "2", "--crf", "--overwrite"]
    plain = json.loads(_run(segment, base[:-2] + ["--overwrite"], root / "plain.json"))
    monkeypatch.setattr(densecrf, "available", lambda: False)
    assert json.loads(_run(segment, base, root / "nocrf.json")) == plain
    out = capsys.readouterr()
    assert "no CRF" in out.out and "not installed" in out.err
    monkeypatch.undo()
    if densecrf.available():
        refined = json.loads(_run(segment, base, root / "crf.json"))
        assert "no CRF" not in capsys.readouterr().out
        assert refined != plain and all(r["segmentation"]["size"] == [40, 40] for r in refined)


def _run(segment, args, out):
    assert segment.main(args + ["--out", str(out)]) == 0
    return out.read_text()
