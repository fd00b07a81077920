"""Captions of an image-text sample: which texts count as captions, and which one a step uses."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np


def parse_captions(text: bytes | None, meta: bytes | None) -> list[str]:
    """Non-empty captions of a sample: the lines of ``.txt``; else the json's ``caption`` (str) or
    ``captions`` (list of str). Empty list if none."""
    if text is not None:
        lines = [ln.strip() for ln in text.decode("utf-8", "replace").splitlines()]
        return [ln for ln in lines if ln]
    if meta is not None:
        try:
            obj = json.loads(meta)
        except ValueError:
            return []
        value = obj.get("caption", obj.get("captions")) if isinstance(obj, dict) else None
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return []


def pick_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
    """One caption, chosen uniformly by ``rng`` when there are several (CLIPA's random caption)."""
    return captions[0] if len(captions) == 1 else captions[int(rng.integers(len(captions)))]
