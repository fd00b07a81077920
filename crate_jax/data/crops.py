"""The two crops every pipeline uses: the Inception crop (train) and resize-small + centre crop (eval).

One implementation of each, on PIL images, plus CLIPA's ops on encoded bytes
(``decode_inception_crop``, ``decode_resize_small_crop``), which choose the crop from the image
header before decoding so that JPEG draft decoding can apply. The Inception box is drawn as TF's
``sample_distorted_bounding_box`` draws it, i.e. big_vision's ``inception_crop``, which the official
CRATE-α code uses for ImageNet classification and for CLIPA (docs/clipa.md §Recipes).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from crate_jax.data.decode import decoding, draft_decode, load_rgb, open_image, to_array

ASPECT_RANGE = (3 / 4, 4 / 3)


def sample_distorted_box(
    width: int, height: int, rng: np.random.Generator, area_range: tuple[float, float] = (0.4, 1.0),
    aspect_range: tuple[float, float] = ASPECT_RANGE, attempts: int = 100,
) -> tuple[int, int, int, int]:
    """Crop box ``(x, y, w, h)`` as TF's ``sample_distorted_bounding_box`` draws it: aspect ``w/h``
    uniform in ``aspect_range``, height uniform between the heights giving the min and max area
    (fractions of the image area), up to ``attempts`` tries, else the whole image."""
    if area_range[0] >= 1.0:  # only the whole image has 100 % of the area (TF ends up there too)
        return 0, 0, width, height
    min_area, max_area = area_range[0] * width * height, area_range[1] * width * height
    for _ in range(attempts):
        aspect = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * rng.random()
        h = int(round(math.sqrt(min_area / aspect)))
        max_h = int(round(math.sqrt(max_area / aspect)))
        if round(max_h * aspect) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if round(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(0, max_h - h + 1))
        w = int(round(h * aspect))
        if w * h < min_area:
            h += 1
            w = int(round(h * aspect))
        if w * h > max_area:
            h -= 1
            w = int(round(h * aspect))
        if w * h < min_area or w * h > max_area or not (0 < w <= width and 0 < h <= height):
            continue
        y = int(rng.integers(0, height - h)) if h < height else 0
        x = int(rng.integers(0, width - w)) if w < width else 0
        return x, y, w, h
    return 0, 0, width, height


def _scaled(box: tuple[float, float, float, float], sx: float, sy: float) -> tuple[float, float, float, float]:
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def inception_crop(img: Image.Image, rng: np.random.Generator, size: int, area_min: float = 0.08,
                   area_max: float = 1.0, draft: bool = False) -> Image.Image:
    """Random-area (``area_min..area_max`` of the image), random-aspect (3/4..4/3) crop, resized to
    ``[size, size]`` with PIL's bilinear filter, which widens its support when downscaling (TF's
    ``antialias=True``). ``img`` may be opened but not loaded yet; ``draft`` then lets libjpeg decode
    at a smaller scale when the crop keeps at least ``size`` pixels (see ``draft_decode``)."""
    x, y, w, h = sample_distorted_box(img.width, img.height, rng, (area_min, area_max))
    box = (x, y, x + w, y + h)
    if draft:
        box = _scaled(box, *draft_decode(img, math.ceil(img.width * size / w), math.ceil(img.height * size / h)))
    return load_rgb(img).resize((size, size), Image.Resampling.BILINEAR, box=box)


def resize_small_centre_crop(img: Image.Image, resize_small: int, size: int, *,
                             resample: Image.Resampling = Image.Resampling.BILINEAR, one_pass: bool = False,
                             draft: bool = False) -> Image.Image:
    """Short side to ``resize_small``, then the centre ``[size, size]`` (big_vision's ``resize_small``
    + ``central_crop``). ``img`` may be opened but not loaded yet (``draft``: see ``draft_decode``).

    Two ways to compute it, each pinned by results that must not move:

    * ``one_pass=False`` (classification eval, bilinear): the whole image is resized, its long side
      rounded to whole pixels, and the centre is cut out of that;
    * ``one_pass=True`` (CLIPA eval, ``resample=BOX``, i.e. area averaging): the centre box is mapped
      back onto the source at the exact scale and resampled once, so no pixel outside it is resized.

    They differ slightly (the long side's scale, rounded or exact; the last bit of some pixels), so
    neither can stand in for the other without moving those results.
    """
    if resize_small < size:
        raise ValueError(f"resize_small={resize_small} must be >= the crop size {size}")
    scale = resize_small / min(img.width, img.height)
    new_w, new_h = max(resize_small, round(img.width * scale)), max(resize_small, round(img.height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = draft_decode(img, new_w, new_h) if draft else (1.0, 1.0)
    if one_pass:
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        return load_rgb(img).resize((size, size), resample, box=_scaled(box, sx, sy))
    return load_rgb(img).resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def decode_inception_crop(
    data: bytes, size: int, rng: np.random.Generator, area_min: float = 40, area_max: float = 100,
    fast_decode: bool = False,
) -> np.ndarray:
    """CLIPA train op ``decode_jpeg_and_inception_crop(size, area_min, bilinear, antialias)`` on encoded
    bytes: ``uint8 [size, size, 3]``. Areas in percent; ``fast_decode``: JPEG draft decoding, much
    faster for large JPEGs, pixels change slightly. Raises DecodeError for a bad image."""
    with decoding():
        return to_array(inception_crop(open_image(data), rng, size, area_min / 100, area_max / 100, fast_decode))


def decode_resize_small_crop(data: bytes, size: int, fast_decode: bool = False) -> np.ndarray:
    """CLIPA eval op ``resize_small(size) -> central_crop(size)`` (area resampling) on encoded bytes:
    ``uint8 [size, size, 3]``. Raises DecodeError for a bad image."""
    with decoding():
        img = resize_small_centre_crop(open_image(data), size, size, resample=Image.Resampling.BOX, one_pass=True,
                                       draft=fast_decode)
        return to_array(img)
