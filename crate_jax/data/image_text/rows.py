"""What one image-text sample becomes, for the webdataset and the TFDS readers alike.

* train row: CLIPA's random caption and inception crop (docs/clipa.md §Recipes), both from the sample's rng;
  train batch: images stacked, captions tokenised;
* eval row: the first caption, an optional integer label and the resize-small + centre crop;
* eval batch: rows padded to the fixed batch size, with ``mask``, tokens and labels blanked on padding.

A sample that cannot be used becomes a skip marker ``{'error': message, 'kind': kind}`` (``kind`` one
of ``batching.STAT_KEYS``), which the reader counts and logs with ``SkipCounter.skip``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from crate_jax.data.batching import pad_rows
from crate_jax.data.crops import decode_inception_crop, decode_resize_small_crop
from crate_jax.data.decode import DecodeError
from crate_jax.data.image_text.captions import pick_caption


def skip(kind: str, message: str) -> dict[str, str]:
    return {"error": message, "kind": kind}


def missing(where: str, image: bytes | None, captions: list[str] | None) -> dict[str, str] | None:
    """The skip marker of a sample without image, or without caption (``captions=None``: not needed)."""
    if image is None:
        return skip("missing_images", f"{where} has no image")
    if captions is not None and not captions:
        return skip("missing_captions", f"{where} has no caption")
    return None


def train_row(where: str, image: bytes | None, captions: list[str], rng: np.random.Generator, *, image_size: int,
              area_min: float, area_max: float, fast_decode: bool) -> dict[str, Any]:
    """``{'image': uint8 [S, S, 3], 'caption'}`` or a skip marker; areas in percent."""
    bad = missing(where, image, captions)
    if bad is not None:
        return bad
    caption = pick_caption(captions, rng)  # before the crop: both draw from rng, in this order
    try:
        pixels = decode_inception_crop(image, image_size, rng, area_min, area_max, fast_decode)
    except DecodeError as e:
        return skip("bad_images", f"{where}: undecodable image ({e})")
    return {"image": pixels, "caption": caption}


def train_batch(rows: list[dict[str, Any]], tokenizer, with_keys: bool) -> dict[str, np.ndarray]:
    """``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L]}`` (plus ``'key'``, an object array, if
    ``with_keys``) from ``B`` train rows."""
    batch = {"image": np.stack([r["image"] for r in rows]), "text": tokenizer([r["caption"] for r in rows])}
    if with_keys:
        batch["key"] = np.array([r["key"] for r in rows], dtype=object)
    return batch


def eval_row(where: str, key: str, image: bytes | None, captions: list[str], *, need_caption: bool,
             label: Callable[[], int] | None, label_name: str, image_size: int, fast_decode: bool) -> dict[str, Any]:
    """``{'image', 'caption' (the first; '' if none), 'label' (-1 without ``label``), 'key'}`` or a skip
    marker. ``label`` reads the sample's integer label (any exception: the sample has none, and the
    skip message names ``label_name``)."""
    bad = missing(where, image, captions if need_caption else None)
    if bad is not None:
        return bad
    value = -1
    if label is not None:
        try:
            value = int(label())
        except Exception:
            return skip("missing_labels", f"{where} has no integer {label_name}")
    try:
        pixels = decode_resize_small_crop(image, image_size, fast_decode)
    except DecodeError as e:
        return skip("bad_images", f"{where}: undecodable image ({e})")
    return {"image": pixels, "caption": captions[0] if captions else "", "label": value, "key": key}


def eval_batch(rows: list[dict[str, Any]], *, batch_size: int, image_size: int, tokenizer=None,
               labels: bool = False, captions: bool = False, keys: bool = False) -> dict[str, Any]:
    """One eval batch from ``rows`` (fewer than ``batch_size`` at the end of a pass): ``'image'`` uint8
    ``[B, S, S, 3]`` (zeros on padding), ``'mask'`` bool ``[B]``, and as asked ``'text'`` int32 ``[B, L]``
    (0 on padding), ``'label'`` int32 ``[B]`` (-1 on padding), ``'caption'`` / ``'key'`` lists of
    ``B`` str ('' on padding)."""
    pad = {"image": np.zeros((image_size, image_size, 3), np.uint8), "caption": "", "label": -1, "key": ""}
    full, mask = pad_rows(rows, batch_size, pad)
    batch: dict[str, Any] = {"image": np.stack([r["image"] for r in full]), "mask": mask}
    texts = [r["caption"] for r in full]
    if tokenizer is not None:
        text = tokenizer(texts)
        text[len(rows):] = 0
        batch["text"] = text
    if labels:
        batch["label"] = np.array([r["label"] for r in full], np.int32)
    if captions:
        batch["caption"] = texts
    if keys:
        batch["key"] = [r["key"] for r in full]
    return batch
