"""Decoding images: encoded bytes or arrays to RGB PIL images, JPEG draft decoding, one error type.

Every pipeline decodes here, so a corrupt, truncated or unknown image raises :class:`DecodeError`
(with PIL's reason) wherever it is read, and the readers skip, count and name it. Decoding is split
in two steps, :func:`open_image` (reads the header only) and :func:`load_rgb`, so that a crop can be
chosen from the size and libjpeg told to decode at a smaller scale (:func:`draft_decode`) before
any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image


class DecodeError(ValueError):
    """An image could not be decoded (corrupt, truncated, unknown format, bad array)."""


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """Turns whatever PIL raises on bad data (OSError, SyntaxError, ValueError, DecompressionBombError,
    ...) into :class:`DecodeError`. Decoding is lazy, so a crop of a lazily opened image runs inside."""
    try:
        yield
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as e:  # PIL's own message names a BytesIO address
        raise DecodeError("UnidentifiedImageError: not a recognised image format") from e
    except Exception as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def open_image(data: bytes) -> Image.Image:
    """Opens encoded bytes (JPEG/PNG/...) lazily: the size is known, no pixel is decoded yet."""
    with decoding():
        img = Image.open(io.BytesIO(data))
    if img.width <= 0 or img.height <= 0:
        raise DecodeError(f"image has an empty size {img.size}")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes an opened image (a no-op once loaded) and converts it to mode 'RGB' if it is not."""
    with decoding():
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes | np.ndarray) -> Image.Image:
    """Encoded bytes, or a uint8 array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (alpha
    dropped), to a fully loaded RGB PIL image. Truncated files fail (as long as
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default False)."""
    if isinstance(data, np.ndarray):
        return _array_to_pil(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected encoded image bytes or a uint8 array, got {type(data).__name__}")
    return load_rgb(open_image(data))


def decode_record(record) -> tuple[Image.Image | None, dict | None]:
    """`(image, None)` for a readable record, `(None, marker)` for one the reader already marked bad or
    whose image does not decode; the marker `{'error', 'id'}` is what the loaders skip and count."""
    ident = str(record.get("id", "?"))
    if "error" in record:
        return None, {"error": str(record["error"]), "id": ident}
    try:
        return decode_image(record["image"]), None
    except DecodeError as e:
        return None, {"error": str(e), "id": ident}


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise DecodeError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or 0 in arr.shape:
        raise DecodeError(f"image array must be [H, W] or [H, W, 1|3|4], got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def draft_decode(img: Image.Image, want_w: int, want_h: int) -> tuple[float, float]:
    """Asks libjpeg to decode an opened, not yet loaded JPEG at 1/2, 1/4 or 1/8 scale (in the DCT
    domain, much faster for large images) while keeping at least ``want_w x want_h`` pixels.

    Returns the factors ``(sx, sy)`` by which the image shrank, to rescale crop boxes with; ``(1, 1)``
    for other formats. Pixels change slightly against a full decode.
    """
    if img.format != "JPEG":
        return 1.0, 1.0
    w0, h0 = img.size
    img.draft("RGB", (max(1, want_w), max(1, want_h)))
    return img.size[0] / w0, img.size[1] / h0


def to_array(img: Image.Image) -> np.ndarray:
    """PIL RGB image -> uint8 array ``[H, W, 3]``."""
    return np.asarray(img, dtype=np.uint8)
