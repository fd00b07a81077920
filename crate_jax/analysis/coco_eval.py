"""Class-agnostic COCO evaluation through `pycocotools` and COCO results records for predicted masks.

`score(annotations, predictions, iou_types)`: every annotation's and prediction's category becomes one
(`category_id` 1, "object"), crowd regions keep `iscrowd` (COCO matches detections to them without
penalty), and `pycocotools.cocoeval.COCOeval` runs unchanged, so the numbers are pycocotools' own. Returns
per IoU type (`segm`, `bbox`) the twelve COCO statistics under the names of `STAT_NAMES` (`-1` where COCO
has nothing to measure, e.g. no ground truth of that size).

`result_records(image_id, masks)`: COCO results for binary masks at the image's resolution: RLE
`segmentation`, `bbox` `[x, y, w, h]`, `score`, `category_id` 1.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("segm", "bbox")
CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def _require_pycocotools():
    try:
        from pycocotools.coco import COCO  # noqa: F401
    except ImportError as e:
        raise RuntimeError("COCO scoring needs pycocotools: pip install pycocotools") from e


def encode_mask(mask: np.ndarray) -> dict:
    """COCO RLE of a `bool [H, W]` mask, `counts` as a str (JSON-ready)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def result_records(image_id: int, masks: Sequence[np.ndarray], scores: Sequence[float] | None = None) -> list[dict]:
    """One COCO result per non-empty mask: `image_id`, `category_id` 1, RLE `segmentation`, `bbox`, `score`."""
    from pycocotools import mask as mask_util

    out = []
    for i, m in enumerate(masks):
        if not np.any(m):
            continue
        rle = encode_mask(m)
        out.append({"image_id": int(image_id), "category_id": CATEGORY["id"], "segmentation": rle,
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "score": 1.0 if scores is None else float(scores[i])})
    return out


def _read_json(source, what: str):
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} {source}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} {source} is not JSON: {e}") from None
    return copy.deepcopy(source)


def class_agnostic_ground_truth(dataset: Mapping) -> dict:
    """A copy of a COCO instances dataset with one category; everything else (crowd flags, areas) kept."""
    if not isinstance(dataset, Mapping) or "images" not in dataset or "annotations" not in dataset:
        raise ValueError("annotations: expected a COCO instances file with 'images' and 'annotations'")
    out = dict(dataset)
    out["annotations"] = [dict(a, category_id=CATEGORY["id"]) for a in dataset["annotations"]]
    out["categories"] = [dict(CATEGORY)]
    return out


def class_agnostic_predictions(records: Iterable[Mapping], image_ids: set[int]) -> list[dict]:
    """Prediction records with `category_id` 1; checks the fields COCO needs and that images are known."""
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "image_id" not in r or "score" not in r:
            raise ValueError(f"predictions[{i}]: expected a COCO result with image_id, score and a segmentation "
                             f"or bbox, got {str(r)[:120]}")
        if r["image_id"] not in image_ids:
            raise ValueError(f"predictions[{i}]: image_id {r['image_id']} is not in the annotations")
        out.append(dict(r, category_id=CATEGORY["id"]))
    return out


def coco_objects(annotations, predictions):
    """`(COCO ground truth, COCO detections)` after the class-agnostic mapping."""
    _require_pycocotools()
    from pycocotools.coco import COCO

    gt_data = class_agnostic_ground_truth(_read_json(annotations, "annotations"))
    preds = _read_json(predictions, "predictions")
    if not isinstance(preds, list):
        raise ValueError("predictions: expected a JSON list of COCO results")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        records = class_agnostic_predictions(preds, set(gt.getImgIds()))
        if records:
            dt = gt.loadRes(records)
        else:  # loadRes cannot take an empty list; an empty result set scores as COCO scores no detections
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": [dict(CATEGORY)], "annotations": []}
            dt.createIndex()
    return gt, dt


def _stats(gt, dt, iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}


def score(annotations, predictions, iou_types: Sequence[str] = IOU_TYPES) -> dict[str, dict[str, float]]:
    """Class-agnostic COCO metrics. `annotations`: an instances file path or dict; `predictions`: a results
    file path or list. Returns `{iou_type: {stat: value}}`."""
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"iou type {t!r}: choose from {IOU_TYPES}")
    preds = _read_json(predictions, "predictions")
    if "segm" in iou_types and isinstance(preds, list) and any(
            isinstance(r, Mapping) and "segmentation" not in r for r in preds):
        raise ValueError("predictions without a 'segmentation' cannot be scored as masks; use iou type bbox")
    gt, dt = coco_objects(annotations, preds)
    return {t: _stats(gt, dt, t) for t in iou_types}
