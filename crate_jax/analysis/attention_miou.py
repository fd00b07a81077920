"""Coarse segmentation from [CLS] attention, scored by mIoU against VOC-style class masks.

The protocol of "Emergence of Segmentation with Minimalistic White-Box Transformers" (arXiv 2308.16271),
after DINO: the [CLS] token's attention over the patches in the penultimate layer, per head thresholded to
the smallest set of patches holding 60 % of the attention **mass** (`segmentation.threshold_attention`),
upsampled (nearest) to the image. The foreground prediction of an image is the union of its heads' masks;
each head is also scored on its own.

`MIoUMeter` accumulates over a dataset (VOC style: intersections and unions summed over all images, pixels
labelled 255 ignored):

* `fg_iou`, `bg_iou`, `miou` (their mean): foreground (any class > 0) vs background;
* `jaccard`: the mean over images of the per-image foreground IoU (DINO's number);
* `head_fg_iou` (per head) and `best_head_fg_iou`;
* with classes in the masks, `class_miou` and `class_iou` (per class id): the predicted foreground takes
  the ground-truth class that covers most of it in that image (one label per image: the attention map has
  no classes of its own), background stays 0; the mean runs over the classes that occur, background included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crate_jax import errors
from crate_jax.analysis.cutler import resize_mask, upsample
from crate_jax.analysis.segmentation import threshold_attention

MASS = 0.6
IGNORE = 255


def head_masks(attn: np.ndarray, grid: tuple[int, int], mass: float = MASS) -> np.ndarray:
    """`bool [K, h, w]`: each head's smallest set of patches holding `mass` of its cls attention `attn [K, N]`."""
    return threshold_attention(attn, mass).reshape(attn.shape[0], *grid)


def _iou(inter: float, union: float) -> float:
    return float(inter / union) if union > 0 else float("nan")


class MIoUMeter:
    """Accumulates predicted foreground masks against class masks; `result()` gives the metrics."""

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.inter = np.zeros(2)  # background, foreground
        self.union = np.zeros(2)
        self.head_inter = np.zeros(num_heads)
        self.head_union = np.zeros(num_heads)
        self.jaccards: list[float] = []
        self.class_inter: dict[int, float] = {}
        self.class_union: dict[int, float] = {}

    def add(self, heads: np.ndarray, target: np.ndarray) -> None:
        """`heads bool [K, H, W]` per-head foreground at the target's resolution; `target [H, W]` class ids
        (0 background, 255 ignored)."""
        target = np.asarray(target)
        valid = target != IGNORE
        gt = (target > 0) & valid
        pred = heads.any(axis=0) & valid
        for c, (p, g) in enumerate(((~pred & valid, ~gt & valid), (pred, gt))):
            self.inter[c] += np.sum(p & g)
            self.union[c] += np.sum(p | g)
        union = np.sum(pred | gt)
        self.jaccards.append(float(np.sum(pred & gt) / union) if union else 1.0)
        for k in range(self.num_heads):
            hk = heads[k] & valid
            self.head_inter[k] += np.sum(hk & gt)
            self.head_union[k] += np.sum(hk | gt)
        classes = target[pred & gt]
        label = int(np.bincount(classes).argmax()) if classes.size else 0
        pred_cls = np.where(pred, label, 0)
        for c in np.unique(np.concatenate([np.unique(target[valid]), [label, 0]])):
            c = int(c)
            p, g = (pred_cls == c) & valid, (target == c) & valid
            self.class_inter[c] = self.class_inter.get(c, 0.0) + float(np.sum(p & g))
            self.class_union[c] = self.class_union.get(c, 0.0) + float(np.sum(p | g))

    def result(self) -> dict:
        bg, fg = (_iou(i, u) for i, u in zip(self.inter, self.union))
        heads = [_iou(i, u) for i, u in zip(self.head_inter, self.head_union)]
        out = {"num_images": len(self.jaccards), "fg_iou": fg, "bg_iou": bg, "miou": (fg + bg) / 2,
               "jaccard": float(np.mean(self.jaccards)) if self.jaccards else float("nan"),
               "head_fg_iou": heads, "best_head_fg_iou": float(np.nanmax(heads)) if heads else float("nan")}
        class_iou = {c: _iou(self.class_inter[c], self.class_union[c]) for c in sorted(self.class_union)}
        class_iou = {c: v for c, v in class_iou.items() if self.class_union[c] > 0}
        if len([c for c in class_iou if c > 0]) > 1:  # more than one object class: per-class numbers mean something
            out["class_iou"] = {str(c): v for c, v in class_iou.items()}
            out["class_miou"] = float(np.mean(list(class_iou.values())))
        return out


def score_attention(attn: np.ndarray, targets: list[np.ndarray], grid: int, patch: int, mass: float = MASS) -> dict:
    """`MIoUMeter` metrics of cls attention `attn [M, K, N]` on a `grid × grid` patch grid against class masks
    `targets` (each at its image's size; the head masks are upsampled by `patch`, then resized to it)."""
    meter = MIoUMeter(attn.shape[1])
    for a, target in zip(attn, targets):
        heads = head_masks(a, (grid, grid), mass)
        meter.add(np.stack([resize_mask(upsample(h, patch), *target.shape[:2]) for h in heads]), target)
    return meter.result()


def read_masks(source: str | os.PathLike, names: list[str], shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Class masks for images `names` (sizes `shapes`): from a folder in the VOC layout (`NAME.png`, class ids
    per pixel; palette PNGs read as their indices) or an `.npy` `[M, H, W]` in image order."""
    from PIL import Image

    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".npy":
        arr = np.load(src, allow_pickle=False)
        if arr.ndim != 3 or arr.shape[0] < len(names):
            raise errors.UsageError(f"masks {src}: expected class masks [M, H, W] for {len(names)} images, got "
                                    f"shape {arr.shape}")
        out = [np.asarray(arr[i]) for i in range(len(names))]
    elif src.is_dir():
        out = []
        for n in names:
            p = src / f"{n}.png"
            if not p.is_file():
                raise errors.UsageError(f"masks {src}: no {p.name} for image {n} (VOC layout: NAME.png per image)")
            with Image.open(p) as im:
                out.append(np.asarray(im))
    else:
        raise errors.UsageError(f"masks {source}: expected a folder of NAME.png masks or an .npy [M, H, W]")
    for n, m, hw in zip(names, out, shapes):
        if m.shape[:2] != tuple(hw):
            raise errors.UsageError(f"masks: the mask of {n} is {m.shape[:2]} but the image is {tuple(hw)}")
    return out
