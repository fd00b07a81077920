"""What the segmentation scorers feed on: an image backbone from any bundle, images with their COCO ids,
patch features and [CLS] attention, and MaskCut masks at each image's own resolution.

* `image_backbone(cfg, model)`: the `ImageClassifier` inside a bundle: a classifier itself, a CLIP two-tower
  model's image tower, a SimDINO network's backbone.
* `read_images(source, annotations)`: `[(image_id, name, uint8 [H, W, 3])]` from a folder or an `.npy`. With
  a COCO instances file, the images it lists (by `file_name`, ids from the file); without one, a folder's
  numeric file stems are the ids (COCO's `000000397133.jpg` -> 397133) and an array's image `i` is id `i + 1`.
* `model_inputs(images, size)`: every image resized whole (no crop, as CutLER resizes to 480 × 480) to
  `size × size`, normalised.
* `maskcut_image(...)`: MaskCut on one image's patch features, masks upsampled to the model input, optionally
  refined by the CRF there, then resized (nearest) to the image's own size.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from crate_jax import errors
from crate_jax.analysis import cutler as mc, densecrf, measure, samples


def image_backbone(cfg, model):
    """`(ModelConfig, ImageClassifier)` inside a loaded bundle; raises for models without an image encoder."""
    from crate_jax.models import ModelConfig
    from crate_jax.models.self_distill import SelfDistillConfig
    from crate_jax.models.two_tower import TwoTowerConfig

    if isinstance(cfg, TwoTowerConfig):
        return cfg.image, model.img
    if isinstance(cfg, SelfDistillConfig):
        return cfg.backbone, model.backbone
    if isinstance(cfg, ModelConfig):
        return cfg, model
    raise errors.UsageError(f"a {type(cfg).__name__} bundle has no image backbone to segment with; use a CRATE, "
                            f"CRATE-α or ViT classifier, a CLIP two-tower or a SimDINO bundle")


def load_backbone(path: str | os.PathLike):
    """`(ModelConfig, ImageClassifier)` of the bundle at `path`."""
    if not Path(path).is_dir():
        raise errors.UsageError(f"--checkpoint {path}: no such bundle directory (model.json + params/)")
    try:
        from crate_jax.checkpoint.models import load
    except ImportError:
        from crate_jax.checkpoint.bundle import load_bundle as load
    cfg, model = load(path)
    return image_backbone(cfg, model)


def at_size(cfg, model, size: int | None):
    """The backbone at `size` px input (position embedding resampled when it differs from the trained size)."""
    if size is None or size == cfg.image_size:
        return cfg, model
    from crate_jax.predict_io import at_resolution

    return at_resolution(cfg, model, size, interpolate=True, source="the bundle")


def _read_annotations(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise errors.UsageError(f"--annotations {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.UsageError(f"--annotations {path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise errors.UsageError(f"--annotations {path}: expected a COCO instances file with an 'images' list")
    return data


def open_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise errors.UsageError(f"cannot decode image {path}: {e}") from None


def image_entries(source: str | os.PathLike, annotations: str | os.PathLike | dict | None = None,
                  max_images: int | None = None) -> list[tuple[int, str, Callable[[], np.ndarray]]]:
    """`[(image_id, name, load)]`, `load()` -> `uint8 [H, W, 3]`: images are read when needed, so a large set
    (COCO val2017) streams through in chunks."""
    src = Path(source)
    data = annotations if isinstance(annotations, dict) else (
        _read_annotations(annotations) if annotations is not None else None)
    if src.is_dir():
        if data is not None:
            entries = sorted(data["images"], key=lambda e: e["id"])
            missing = [e["file_name"] for e in entries if not (src / e["file_name"]).is_file()]
            if missing:
                raise errors.UsageError(f"--images {src}: {len(missing)} image(s) of the annotations are missing, "
                                        f"e.g. {missing[0]}")
            entries = entries[:max_images] if max_images else entries
            return [(int(e["id"]), Path(e["file_name"]).stem, functools.partial(open_rgb, src / e["file_name"]))
                    for e in entries]
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in samples.IMAGE_SUFFIXES)
        if not files:
            raise errors.UsageError(f"--images {src} holds no images")
        bad = [p.name for p in files if not p.stem.isdigit()]
        if bad:
            raise errors.UsageError(f"--images {src}: {bad[0]} has no numeric name to serve as its COCO image "
                                    f"id; pass --annotations instances.json to take ids from it")
        files = files[:max_images] if max_images else files
        return [(int(p.stem), p.stem, functools.partial(open_rgb, p)) for p in files]
    if src.is_file() and src.suffix.lower() == ".npy":
        arr = np.load(src, allow_pickle=False, mmap_mode="r")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise errors.UsageError(f"--images {src}: expected images [M, H, W, 3], got shape {arr.shape}")
        ids = list(range(1, arr.shape[0] + 1))
        if data is not None:
            entries = sorted(data["images"], key=lambda e: e["id"])
            if len(entries) != arr.shape[0]:
                raise errors.UsageError(f"--images {src} holds {arr.shape[0]} images but the annotations list "
                                        f"{len(entries)}; an array's images pair with the annotations' in id order")
            ids = [int(e["id"]) for e in entries]
        n = min(arr.shape[0], max_images or arr.shape[0])
        return [(ids[i], f"{src.stem}_{i}",
                 functools.partial(lambda i: samples.to_rgb_uint8(np.asarray(arr[i]), f"{src}[{i}]"), i))
                for i in range(n)]
    raise errors.UsageError(f"--images {source}: expected a folder of images or an .npy array")


def read_images(source: str | os.PathLike, annotations: str | os.PathLike | dict | None = None,
                max_images: int | None = None) -> list[tuple[int, str, np.ndarray]]:
    """`[(image_id, name, uint8 [H, W, 3])]` (module docstring), all read now."""
    return [(i, name, load()) for i, name, load in image_entries(source, annotations, max_images)]


def model_inputs(images: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(display uint8 [M, S, S, 3], normalised float32 [M, S, S, 3])`, each image resized whole (bicubic)."""
    display = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC), np.uint8)
                        for im in images])
    return display, samples.normalize(display)


def features_and_attention(model, normalized: np.ndarray, layer: int, batch_size: int = 16):
    """`(attn [M, K, N], features [M, N, F])` of one layer: MSSA `qkv` (CRATE, CRATE-α) or keys (ViT)."""
    return measure.attention_and_features(model, normalized, layer=layer, feature="mssa", batch_size=batch_size)


def maskcut_image(features: np.ndarray, grid: int, patch: int, original_hw: tuple[int, int], *,
                  display: np.ndarray | None = None, crf: bool = False, n_masks: int = mc.N_MASKS,
                  tau: float = mc.TAU, solver: str = "auto") -> list[np.ndarray]:
    """MaskCut masks of one image at its own size `bool [H, W]` from `features [N, F]` on a `grid × grid`
    patch grid; `crf` refines each at the model input (`display`, the resized image) first."""
    grid_masks = mc.maskcut(np.asarray(features).reshape(grid, grid, -1), n_masks=n_masks, tau=tau,
                            solver=solver)
    out = []
    for m in grid_masks:
        m = mc.upsample(m, patch)
        if crf:
            m = densecrf.refine(display, m)
            if m is None:
                continue
        m = mc.resize_mask(m, *original_hw)
        if m.any():
            out.append(m)
    return out
