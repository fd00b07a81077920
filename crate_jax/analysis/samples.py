"""Images for the analysis: a folder, an `.npy` array, or a bundled sample set, resized for a model.

Every source becomes an `ImageSet`: `display` `uint8 [M, S, S, 3]` (what the plots overlay) and
`normalized` `float32 [M, S, S, 3]` (what the model sees), `S = cfg.image_size`. Preprocessing is
the evaluation transform without the 0.875 crop by default: resize the short side to
`S / crop_fraction` (bicubic), centre-crop `S × S`, scale to [0, 1], subtract the ImageNet mean and
divide by its std (docs/weights.md §Layouts).

The bundled sets are photos that ship inside scikit-image (`skimage.data`) and the held-out split of
scikit-learn's digits (`digits-test`, the split `configs/digits.py` evaluates on), so the analysis runs
offline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# name -> skimage.data loaders; all of these are inside the scikit-image wheel (no download).
SAMPLE_SETS: dict[str, tuple[str, ...]] = {
    "skimage": ("astronaut", "cat", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                "immunohistochemistry"),
    "skimage-objects": ("astronaut", "cat", "coffee", "rocket"),
}
# name -> (classification source, split): real datasets bundled with a package.
DATASET_SETS: dict[str, tuple[str, str]] = {"digits-test": ("digits", "test")}
SAMPLE_SETS.update({k: () for k in DATASET_SETS})


class ImageSourceError(ValueError):
    """An image source that cannot be read; the message names the path and what was expected."""


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """`names [M]`, `display uint8 [M, S, S, 3]`, `normalized float32 [M, S, S, 3]`."""

    names: tuple[str, ...]
    display: np.ndarray
    normalized: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def to_rgb_uint8(img: np.ndarray, what: str) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` (uint8, bool, or float in [0, 1]) -> `uint8 [H, W, 3]`."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ImageSourceError(f"{what}: expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels "
                               f"last), got shape {img.shape}")
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif np.issubdtype(img.dtype, np.floating):
        bad = int(np.size(img) - np.isfinite(img).sum())
        if bad:
            raise ImageSourceError(f"{what}: {bad} of {img.size} values are NaN or infinite; an image needs finite "
                                   f"RGB values (uint8 [0, 255], or float in [0, 1])")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageSourceError(f"{what}: float images must hold RGB values in [0, 1], got range [{lo:g}, {hi:g}]; "
                                   f"save uint8 [0, 255] or divide by 255")
        img = np.round(img * 255.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        if img.min() < 0 or img.max() > 255:
            raise ImageSourceError(f"{what}: integer images must hold values in [0, 255], got dtype {img.dtype} "
                                   f"range [{img.min()}, {img.max()}]")
        img = img.astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def resize_center_crop(img: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """`uint8 [H, W, 3] -> uint8 [size, size, 3]`: bicubic resize of the short side to
    `round(size / crop_fraction)`, then a centre crop (crop_fraction 0.875 is the ImageNet eval transform)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = img.shape[:2]
    short = max(size, int(round(size / crop_fraction)))
    scale = short / min(h, w)
    nh, nw = max(short, int(round(h * scale))), max(short, int(round(w * scale)))
    pil = Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


def normalize(display: np.ndarray) -> np.ndarray:
    """`uint8 [..., 3] -> float32 [..., 3]`: `(x / 255 - mean) / std` with the ImageNet statistics."""
    return ((display.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def sample_names(name: str) -> tuple[str, ...]:
    """The skimage photos of a bundled sample set; raises with the list of valid set names."""
    if name not in SAMPLE_SETS:
        raise ImageSourceError(f"unknown sample set {name!r} (and no such file or folder); bundled sample sets: "
                               f"{', '.join(sorted(SAMPLE_SETS))}")
    return SAMPLE_SETS[name]


def _load_sample_set(name: str) -> list[tuple[str, np.ndarray]]:
    if name in DATASET_SETS:  # e.g. the digits test split (stratified, split seed 0, as configs/digits.py)
        from crate_jax.data.images.classification import DigitsSource
        source, split = DATASET_SETS[name]
        src = DigitsSource(split)
        return [(f"{name}_{i:04d}_label{int(src[i]['label'])}", to_rgb_uint8(src[i]["image"], f"{name}[{i}]"))
                for i in range(len(src))]
    import skimage.data

    out = []
    for photo in sample_names(name):
        out.append((photo, to_rgb_uint8(getattr(skimage.data, photo)(), f"skimage.data.{photo}")))
    return out


def _load_folder(folder: Path) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageSourceError(f"image folder {folder} holds no images (looked for files ending in "
                               f"{', '.join(IMAGE_SUFFIXES)}; subfolders are not searched)")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                out.append((path.stem, np.asarray(im.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as e:
            raise ImageSourceError(f"cannot decode image {path}: {e}; remove or replace the file") from e
    return out


def _load_npy(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ImageSourceError(f"cannot read {path} as a numpy array: {e}") from e
    expected = "expected images channels-last: [M, H, W, 3], [M, H, W, 1], [M, H, W], or one image [H, W, 3]"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[-1] not in (1, 3, 4):
        raise ImageSourceError(f"{path}: array of shape {arr.shape} has {arr.shape[-1]} channels in the last axis; "
                               f"{expected} (transpose NCHW arrays to NHWC)")
    elif arr.ndim not in (3, 4):
        raise ImageSourceError(f"{path}: array of shape {arr.shape}; {expected}")
    if arr.shape[0] == 0:
        raise ImageSourceError(f"{path}: the array holds no images (shape {arr.shape})")
    width = len(str(arr.shape[0] - 1))
    return [(f"{path.stem}_{i:0{width}d}", to_rgb_uint8(arr[i], f"{path}[{i}]")) for i in range(arr.shape[0])]


def load_images(source: str | Path, image_size: int, *, max_images: int | None = None,
                crop_fraction: float = 1.0) -> ImageSet:
    """Reads `source` (a folder of images, an `.npy` array, or a name in `SAMPLE_SETS`) and prepares it for a
    model of resolution `image_size`. Names are file stems, `<stem>_<index>` for arrays, skimage names for sets."""
    path = Path(source)
    if path.is_dir():
        raw = _load_folder(path)
    elif path.is_file():
        if path.suffix.lower() != ".npy":
            raise ImageSourceError(f"{path}: expected a folder of images, an .npy array or a sample set name "
                                   f"({', '.join(sorted(SAMPLE_SETS))})")
        raw = _load_npy(path)
    elif str(source) in SAMPLE_SETS:
        raw = _load_sample_set(str(source))
    else:
        looks_like_path = any(sep in str(source) for sep in ("/", "\\")) or path.suffix
        if looks_like_path:
            raise ImageSourceError(f"image source {source} does not exist (expected a folder of images, an .npy "
                                   f"array, or a bundled sample set: {', '.join(sorted(SAMPLE_SETS))})")
        sample_names(str(source))  # raises with the list of sets
        raise AssertionError("unreachable")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        raw = raw[:max_images]
    display = np.stack([resize_center_crop(img, image_size, crop_fraction) for _, img in raw])
    return ImageSet(tuple(_unique([n for n, _ in raw])), display, normalize(display))


def _unique(names: list[str]) -> list[str]:
    """Makes names usable as distinct output folder names."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in n) or "image"
        k = seen.get(safe, 0)
        seen[safe] = k + 1
        out.append(safe if k == 0 else f"{safe}_{k}")
    return out
