"""`crate_jax.analysis.coco_eval` / `segment score`: class-agnostic COCO AP equals pycocotools' own COCOeval on
hand-made predictions (perfect, shifted, missing, extra, crowd) and on random files it has never seen."""

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from crate_jax import segment  # noqa: E402
from crate_jax.analysis import coco_eval  # noqa: E402

SIZE = 96


def rect(x0, y0, x1, y1, h=SIZE, w=SIZE):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def gt_ann(ann_id, image_id, mask, category_id=1, iscrowd=0):
    ys, xs = np.nonzero(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentation": coco_eval.encode_mask(mask), "area": float(mask.sum()),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]}


def dataset(anns, n_images, categories=(1,)):
    return {"images": [{"id": i, "file_name": f"{i:06d}.png", "height": SIZE, "width": SIZE}
                       for i in range(1, n_images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in categories]}


def reference(gt_data, preds, iou_type):
    """pycocotools used directly, on single-category copies made here (not by the code under test)."""
    gt_data = json.loads(json.dumps(gt_data))
    for a in gt_data["annotations"]:
        a["category_id"] = 1
    gt_data["categories"] = [{"id": 1, "name": "object"}]
    preds = [dict(p, category_id=1) for p in json.loads(json.dumps(preds))]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(preds), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(coco_eval.STAT_NAMES, map(float, ev.stats)))


def assert_matches(gt_data, preds):
    got = coco_eval.score(gt_data, preds)
    for t in ("segm", "bbox"):
        want = reference(gt_data, preds, t)
        for k in coco_eval.STAT_NAMES:
            assert got[t][k] == pytest.approx(want[k], abs=1e-9), (t, k)
    return got


def scene():
    """Two images: three objects (two categories) and one object next to a crowd region."""
    objs = [(1, rect(5, 5, 40, 40), 1), (1, rect(50, 10, 90, 45), 2), (1, rect(20, 55, 70, 90), 1),
            (2, rect(10, 10, 60, 60), 1)]
    anns = [gt_ann(i + 1, img, m, cat) for i, (img, m, cat) in enumerate(objs)]
    anns.append(gt_ann(len(anns) + 1, 2, rect(65, 65, 95, 95), 1, iscrowd=1))
    return dataset(anns, 2, categories=(1, 2)), objs


def preds_of(items):
    return [r for img, m, s in items for r in coco_eval.result_records(img, [m], [s])]


def test_perfect_predictions_score_one_and_match_pycocotools():
    gt, objs = scene()
    got = assert_matches(gt, preds_of([(img, m, 1.0) for img, m, _ in objs]))
    assert got["segm"]["AP"] == pytest.approx(1.0) and got["bbox"]["AP50"] == pytest.approx(1.0)
    assert got["segm"]["AR100"] == pytest.approx(1.0)


def test_shifted_missing_extra_and_crowd_match_pycocotools():
    gt, objs = scene()
    shifted = [(img, np.roll(m, 6, axis=1), 0.9) for img, m, _ in objs]
    got = assert_matches(gt, preds_of(shifted))
    assert 0.0 < got["segm"]["AP"] < 1.0
    missing = [(img, m, 1.0) for img, m, _ in objs[:2]]
    got = assert_matches(gt, preds_of(missing))
    assert got["segm"]["AR100"] == pytest.approx(0.5)
    extra = [(img, m, 0.8) for img, m, _ in objs] + [(1, rect(60, 60, 80, 80), 0.95)]
    got = assert_matches(gt, preds_of(extra))
    assert got["segm"]["AP"] < 1.0
    # a detection on the crowd region is neither a hit nor a false positive
    crowd = [(img, m, 0.8) for img, m, _ in objs] + [(2, rect(66, 66, 94, 94), 0.99)]
    got = assert_matches(gt, preds_of(crowd))
    assert got["segm"]["AP"] == pytest.approx(1.0)


def test_no_predictions_and_bbox_only():
    gt, objs = scene()
    got = coco_eval.score(gt, [])
    assert got["segm"]["AP"] == 0.0 and got["segm"]["APl"] == -1.0  # no large objects: COCO's -1
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in preds_of([(i, m, 1.0) for i, m, _ in objs])]
    assert coco_eval.score(gt, boxes, ("bbox",))["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="segmentation"):
        coco_eval.score(gt, boxes, ("segm",))
    with pytest.raises(ValueError, match="not in the annotations"):
        coco_eval.score(gt, preds_of([(9, objs[0][1], 1.0)]))


def random_files(seed):
    rng = np.random.default_rng(seed)
    anns, preds = [], []
    n_images = int(rng.integers(3, 7))
    for img in range(1, n_images + 1):
        for _ in range(int(rng.integers(0, 5))):
            x0, y0 = rng.integers(0, SIZE - 8, size=2)
            x1, y1 = x0 + rng.integers(4, SIZE - x0 + 1), y0 + rng.integers(4, SIZE - y0 + 1)
            m = rect(x0, y0, x1, y1)
            anns.append(gt_ann(len(anns) + 1, img, m, int(rng.integers(1, 4)), iscrowd=int(rng.random() < 0.1)))
            if rng.random() < 0.8:  # a noisy detection of it
                d = np.roll(m, tuple(rng.integers(-8, 9, size=2)), axis=(0, 1)) & (rng.random(m.shape) > 0.05)
                if d.any():
                    preds += coco_eval.result_records(img, [d], [float(rng.random())])
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x0, y0 = rng.integers(0, SIZE - 10, size=2)
            preds += coco_eval.result_records(img, [rect(x0, y0, x0 + 10, y0 + 10)], [float(rng.random())])
    return dataset(anns, n_images, categories=(1, 2, 3)), preds


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_random_unseen_files_match_pycocotools(seed):
    gt, preds = random_files(seed)
    if not preds:
        pytest.fail("the generator made no predictions")
    assert_matches(gt, preds)


def test_score_command_writes_metrics_and_guards_inputs(tmp_path, capsys):
    gt, preds = random_files(21)
    ann, pred, out = tmp_path / "instances.json", tmp_path / "preds.json", tmp_path / "metrics.json"
    ann.write_text(json.dumps(gt))
    pred.write_text(json.dumps(preds))
    rc = segment.main(["score", "--annotations", str(ann), "--predictions", str(pred), "--out", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    for t in ("segm", "bbox"):
        want = reference(gt, preds, t)
        assert all(written[t][k] == pytest.approx(want[k], abs=1e-9) for k in coco_eval.STAT_NAMES)
    assert "AP50" in capsys.readouterr().out
    from crate_jax import errors
    assert errors.run(segment.main, ["score", "--annotations", str(ann), "--predictions", str(pred),
                                     "--out", str(out)]) == 2  # exists, no --overwrite
    assert errors.run(segment.main, ["score", "--annotations", str(ann), "--predictions", str(pred),
                                     "--out", str(pred), "--overwrite"]) == 2  # would eat an input
    assert json.loads(pred.read_text()) == preds
    rc = segment.main(["score", "--annotations", str(ann), "--predictions", str(pred), "--out", str(out),
                       "--iou-type", "bbox", "--overwrite"])
    assert rc == 0 and set(json.loads(out.read_text())) == {"bbox"}
