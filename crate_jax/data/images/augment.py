"""Classification augmentation: the train recipe (Inception crop, flip, RandAugment) and the eval recipe.

Everything here works on decoded PIL images (mode 'RGB', from ``decode.decode_image``) and numpy
``np.random.Generator``s and returns ``uint8 [H, W, 3]`` arrays at the end; normalisation happens on
device. The crops themselves are ``crops.inception_crop`` (TF's ``sample_distorted_bounding_box``,
as big_vision draws it) and ``crops.resize_small_centre_crop``. The functions are pure given the
generator, so a pipeline that derives one generator per example index (grain's ``random_map``
does) is deterministic and exactly resumable.

RandAugment follows the timm "increasing magnitude" variant: a magnitude ``m`` in
[0, 10] is scaled to ``level = m / 10`` and every op gets *stronger* as ``m`` grows.
Each of the ``num_layers`` ops is drawn uniformly (with replacement) from the list
below and applied with probability 0.5. Ops marked (±) pick a random sign.

========================  ===========================================================
op                        effect at level L = m / 10
========================  ===========================================================
AutoContrast              ``ImageOps.autocontrast`` (no magnitude)
Equalize                  ``ImageOps.equalize`` (no magnitude)
Invert                    ``ImageOps.invert`` (no magnitude)
Rotate (±)                rotate by 30·L degrees, bilinear, grey (128) fill
PosterizeIncreasing       keep 4 − int(4·L) bits per channel
SolarizeIncreasing        invert pixels >= 256 − int(256·L)
SolarizeAdd               add int(110·L) to pixels < 128 (clipped at 255)
ColorIncreasing (±)       ``ImageEnhance.Color`` factor 1 ± 0.9·L
ContrastIncreasing (±)    ``ImageEnhance.Contrast`` factor 1 ± 0.9·L
BrightnessIncreasing (±)  ``ImageEnhance.Brightness`` factor 1 ± 0.9·L
SharpnessIncreasing (±)   ``ImageEnhance.Sharpness`` factor 1 ± 0.9·L
ShearX / ShearY (±)       affine shear 0.3·L, bilinear, grey fill
TranslateXRel (±)         shift by 0.45·L of the width, grey fill
TranslateYRel (±)         shift by 0.45·L of the height, grey fill
========================  ===========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from crate_jax.data.crops import inception_crop, resize_small_centre_crop
from crate_jax.data.decode import to_array

# Grey fill for pixels that geometric ops move in from outside the image (timm uses the
# same constant).
_FILL = (128, 128, 128)


def resize(img: Image.Image, size: int) -> Image.Image:
    """Plain bilinear resize to ``[size, size]`` (aspect not kept); for tiny images like 8x8 digits."""
    return img.resize((size, size), Image.Resampling.BILINEAR)


def random_flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirrors left-right with probability 0.5."""
    if rng.random() < 0.5:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# ----------------------------------------------------------------------------- RandAugment


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=_FILL)


def _solarize_add(img: Image.Image, add: int) -> Image.Image:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _enhance(enhancer: type) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(img, level, rng):
        return enhancer(img).enhance(1.0 + _signed(0.9 * level, rng))

    return op


# name -> op(img, level in [0, 1], rng); the ops and their level mappings are listed in the
# module docstring.
RANDAUG_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": lambda img, level, rng: img.rotate(
        _signed(30.0 * level, rng), resample=Image.Resampling.BILINEAR, fillcolor=_FILL
    ),
    "PosterizeIncreasing": lambda img, level, rng: _posterize(img, 4 - int(4 * level)),
    "SolarizeIncreasing": lambda img, level, rng: ImageOps.solarize(img, 256 - int(256 * level)),
    "SolarizeAdd": lambda img, level, rng: _solarize_add(img, int(110 * level)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, rng: _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, level, rng: _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0)),
    "TranslateXRel": lambda img, level, rng: _affine(
        img, (1, 0, _signed(0.45 * level, rng) * img.width, 0, 1, 0)
    ),
    "TranslateYRel": lambda img, level, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * img.height)
    ),
}
_RANDAUG_NAMES = tuple(RANDAUG_OPS)
_RANDAUG_PROB = 0.5
_MAX_MAGNITUDE = 10.0


def randaugment(img: Image.Image, rng: np.random.Generator, num_layers: int, magnitude: float) -> Image.Image:
    """Applies ``num_layers`` ops drawn uniformly from ``RANDAUG_OPS``, each with probability 0.5."""
    if not 0 <= magnitude <= _MAX_MAGNITUDE:
        raise ValueError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
    level = magnitude / _MAX_MAGNITUDE
    for idx in rng.integers(0, len(_RANDAUG_NAMES), size=num_layers):
        if rng.random() < _RANDAUG_PROB:
            img = RANDAUG_OPS[_RANDAUG_NAMES[idx]](img, level, rng)
    return img


# ----------------------------------------------------------------------------- full recipes


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Train recipe: crop (Inception or plain resize) -> optional flip -> optional RandAugment.

    Attributes:
      image_size: output side S; the result is uint8 ``[S, S, 3]``.
      crop: 'inception_crop' (``crops.inception_crop``: area ``area_min..1`` of the image, aspect
        3/4..4/3, the whole image if 100 draws fail) or 'none' (plain resize to S x S, for tiny images).
      area_min: smallest crop area as a fraction of the image (0.08 for 8 %).
      flip: random horizontal flip.
      randaug: ``(num_layers, magnitude)`` or None.
    """

    image_size: int
    crop: str = "inception_crop"
    area_min: float = 0.08
    flip: bool = True
    randaug: tuple[int, float] | None = None

    def __post_init__(self):
        if self.crop not in ("inception_crop", "none"):
            raise ValueError(f"crop must be 'inception_crop' or 'none', got {self.crop!r}")
        if not 0.0 < self.area_min <= 1.0:
            raise ValueError(f"area_min must be a fraction in (0, 1], got {self.area_min}")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if self.crop == "inception_crop":
            img = inception_crop(img, rng, self.image_size, self.area_min)
        else:
            img = resize(img, self.image_size)
        if self.flip:
            img = random_flip(img, rng)
        if self.randaug is not None:
            img = randaugment(img, rng, int(self.randaug[0]), float(self.randaug[1]))
        return to_array(img)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
    """Eval recipe: resize the short side to ``resize_small`` then centre-crop S, or (with
    ``resize_small=None``) a plain resize to S x S. Output uint8 ``[S, S, 3]``."""

    image_size: int
    resize_small: int | None = None

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        del rng  # deterministic
        if self.resize_small is None:
            return to_array(resize(img, self.image_size))
        return to_array(resize_small_centre_crop(img, self.resize_small, self.image_size))
