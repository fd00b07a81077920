"""Image files as a bundle's model takes them: a folder of images or one file, decoded to RGB and put through
the bundle's `preprocess.json` (resize / centre-crop rule, [0, 1] scaling, mean / std), channels last.

Used by `python -m crate_jax.predict --images DIR|FILE.png|FILE.jpg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ImageFileError(ValueError):
    """An image path that cannot be read; the message names it and what was expected."""


def is_image_path(path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES


def image_paths(path) -> list[Path]:
    """The images of a folder (sorted by name, not recursive), or the one image file `path`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageFileError(f"image folder {path} holds no images (looked for files ending in "
                                 f"{', '.join(IMAGE_SUFFIXES)}; subfolders are not searched)")
        return files
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file or folder")
    return [path]


def decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageFileError(f"cannot decode image {path}: {e}; remove or replace the file") from e


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """One RGB image -> float32 `[S, S, 3]` by a `preprocess.json` image spec
    (`crate_jax.checkpoint.describe.image_preprocess`): the data loader's own eval transform, then
    `(x * scale - mean) / std`."""
    from crate_jax.data.images.augment import EvalPreprocess
    size = int(spec["size"])
    small = spec.get("resize_small") if spec.get("resize") != "resize" else None
    x = EvalPreprocess(size, int(small) if small else None)(img).astype(np.float32)
    x = x * np.float32(spec.get("scale", 1 / 255))
    return ((x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)).astype(np.float32)


def load_for_model(path, spec: dict) -> tuple[list[str], np.ndarray]:
    """`(names, float32 [N, S, S, 3])` of the images at `path` preprocessed by `spec`."""
    files = image_paths(path)
    return [f.name for f in files], np.stack([preprocess(decode(f), spec) for f in files])
