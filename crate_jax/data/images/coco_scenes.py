"""Synthetic multi-object scenes in COCO format (and VOC-style class masks), for segmentation scoring offline.

Each image draws 2..`max_objects` coloured shapes of `crate_jax.data.image_text.synth_scenes` (its colours, shapes and
desaturated gradient backgrounds with neutral clutter) at random places and sizes; later objects occlude
earlier ones and every object's visible mask is known exactly.

    python -m crate_jax.data.images.coco_scenes --out DIR [--images 50 --image-size 64 --seed 0]

writes

  DIR/images/000001.png ...   the scenes (lossless PNG)
  DIR/instances.json          COCO instances: images, annotations (RLE segmentation, bbox, area,
                              iscrowd 0), categories = the shapes (id 1..)
  DIR/masks/000001.png ...    VOC layout: one `uint8` class id per pixel (0 background, the object's
                              category id elsewhere)

Everything is a pure function of the arguments (image `i` depends only on `(seed, i)`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crate_jax.data.image_text.synth_scenes import _BACKGROUNDS, _NEUTRALS, COLOURS, SHAPES, _shape_points
from crate_jax.data.seeding import sample_rng

_SUPERSAMPLE = 2
MIN_VISIBLE = 0.004  # objects occluded below this fraction of the image are left out of the annotations


def _background(rng: np.random.Generator, big: int) -> Image.Image:
    lo, hi = _BACKGROUNDS[str(rng.choice(list(_BACKGROUNDS)))]
    tint = rng.uniform(-8, 8, size=3)
    ends = [np.clip(rng.uniform(lo, hi) + tint + rng.uniform(-6, 6, size=3), 0, 255) for _ in range(2)]
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
    grad = ends[0][None, None, :] * (1 - ramp[..., None]) + ends[1][None, None, :] * ramp[..., None]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(grad, (big, big, 3)).astype(np.uint8)), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)


def render_objects(rng: np.random.Generator, image_size: int, *, max_objects: int = 4, max_clutter: int = 2,
                   colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES,
                   size_range: tuple[float, float] = (0.22, 0.4)) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: `(uint8 [S, S, 3], [(shape index, visible bool [S, S] mask), ...])`, objects in drawing order."""
    big = image_size * _SUPERSAMPLE
    img = _background(rng, big)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, max_clutter + 1))):
        col = _NEUTRALS[int(rng.integers(len(_NEUTRALS)))]
        x, y = rng.uniform(0, big, size=2)
        rad = rng.uniform(0.015, 0.035) * big
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        r = rng.uniform(*size_range) * big / 2
        for _attempt in range(20):  # keep objects mostly apart: overlaps happen, but rarely swallow one
            cx, cy = rng.uniform(r + 1, big - r - 1, size=2)
            if all(math.hypot(cx - px, cy - py) > 0.8 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        shape_i = int(rng.integers(len(shapes)))
        colour = colours[int(rng.integers(len(colours)))]
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, size=3), 0, 255))
        angle = math.radians(rng.uniform(-15, 15))
        _draw_shape(draw, shapes[shape_i], cx, cy, r, angle, fill)
        layer = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(layer), shapes[shape_i], cx, cy, r, angle, 255)
        small = np.asarray(layer.resize((image_size, image_size), Image.Resampling.BOX)) >= 128
        objects.append((shape_i, small))
    visible = []
    for i, (shape_i, m) in enumerate(objects):  # later objects are drawn on top
        for _, later in objects[i + 1:]:
            m = m & ~later
        visible.append((shape_i, m))
    image = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX))
    return image, visible


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    from crate_jax.analysis.coco_eval import encode_mask

    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": encode_mask(mask),
            "area": float(mask.sum()), "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1),
                                                float(ys.max() - y0 + 1)], "iscrowd": 0}


def write(out_dir: str | os.PathLike, *, num_images: int = 50, image_size: int = 64, seed: int = 0,
          max_objects: int = 4, max_clutter: int = 2, shapes: Sequence[str] = SHAPES) -> dict:
    """Writes the scenes, `instances.json` and the class masks (module docstring); returns the instances dict."""
    if num_images < 1 or image_size < 16 or max_objects < 2:
        raise ValueError("num_images must be >= 1, image_size >= 16 and max_objects >= 2")
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {SHAPES}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        rng = sample_rng(seed, 0xC0C0, i)
        image, objects = render_objects(rng, image_size, max_objects=max_objects, max_clutter=max_clutter,
                                        shapes=shapes)
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(out / "images" / name)
        classes = np.zeros((image_size, image_size), np.uint8)
        for shape_i, mask in objects:
            if mask.mean() < MIN_VISIBLE:
                continue
            annotations.append(_annotation(len(annotations) + 1, image_id, shape_i + 1, mask))
            classes[mask] = shape_i + 1
        Image.fromarray(classes).save(out / "masks" / name)
        images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
    dataset = {"info": {"description": f"crate_jax synthetic scenes, seed {seed}"}, "images": images,
               "annotations": annotations,
               "categories": [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(shapes)]}
    with open(out / "instances.json", "w", encoding="utf-8") as f:
        json.dump(dataset, f)
    return dataset


def main(argv: Sequence[str] | None = None) -> None:
    from crate_jax.cli import tool_parser
    p = tool_parser("crate_jax.data.images.coco_scenes", __doc__)
    p.add_argument("--out", required=True, help="output directory (instances.json, images/, masks/)")
    p.add_argument("--images", type=int, default=50, help="number of scenes")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawing")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per scene")
    p.add_argument("--max-clutter", type=int, default=2, help="most distractor shapes per scene")
    a = p.parse_args(argv)
    data = write(a.out, num_images=a.images, image_size=a.image_size, seed=a.seed, max_objects=a.max_objects,
                 max_clutter=a.max_clutter)
    print(f"wrote {len(data['images'])} images with {len(data['annotations'])} objects to {a.out}")


if __name__ == "__main__":
    from crate_jax import errors

    errors.exit_with(main)
