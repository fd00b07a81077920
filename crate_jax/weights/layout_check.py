"""Checking a state_dict against the layout a model expects, and the one error that lists every problem: shared
by the language-model importers (`crate_jax.weights.gpt`, `crate_jax.weights.bert`)."""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from crate_jax.weights.readers import WeightsError


def is_float(a) -> bool:
    dt = np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype
    return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"


def natural(item):
    """Sort key for `(name, ...)` rows: layer numbers in numeric order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def raise_on_mismatch(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple], *,
                      ignore: Callable[[str], bool], notes: list[str], header: str, hint: str) -> None:
    """Raises one `WeightsError` (`header`, then every missing, unexpected, mis-shaped and non-float tensor, then
    `notes`) unless `tensors` holds exactly `expected` (names `ignore` accepts aside) and `notes` is empty."""
    missing = [(k, s) for k, s in expected.items() if k not in tensors]
    unexpected = [(k, tuple(np.shape(v))) for k, v in tensors.items() if k not in expected and not ignore(k)]
    misshaped = [(k, s, tuple(np.shape(tensors[k]))) for k, s in expected.items()
                 if k in tensors and tuple(np.shape(tensors[k])) != s]
    not_float = [(k, np.asarray(tensors[k]).dtype) for k in expected if k in tensors and not is_float(tensors[k])]
    if not (missing or unexpected or misshaped or not_float or notes):
        return
    lines = [header]
    for title, items, row in (("missing", missing, lambda r: f"{r[0]}  expected {r[1]}"),
                              ("unexpected", unexpected, lambda r: f"{r[0]}  got {r[1]}"),
                              ("mis-shaped", misshaped, lambda r: f"{r[0]}  expected {r[1]}, got {r[2]}"),
                              ("not floating point", not_float, lambda r: f"{r[0]}  dtype {r[1]}")):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {row(r)}" for r in sorted(items, key=natural)]
    lines += [f"  {n}" for n in notes]
    if missing and unexpected:
        lines.append(f"hint: missing and unexpected names together usually mean the wrong --format ({hint}) or a "
                     f"file of another model")
    raise WeightsError("\n".join(lines))
