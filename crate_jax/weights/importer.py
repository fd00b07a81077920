"""Official weight files -> our parameter tree, with every tensor checked first.

`import_tensors(fmt, tensors)` maps a flat dict of official tensors (names as stored in the file)
through the layout tables of `crate_jax.weights.layouts`; `import_weights(fmt, path)` reads the
file first (`crate_jax.weights.readers`). The model config is read from the shapes. The CLI
`python -m crate_jax.convert` and the CLIPA importer (`crate_jax.weights.clipa`) build on these.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from crate_jax.models import ConfigError, ModelConfig, abstract_model
from crate_jax.weights import layouts
from crate_jax.weights.readers import WeightsError, read_tensors


def import_tensors(fmt: str, tensors: dict[str, np.ndarray], variant: str | None = None, *,
                   source: str = "weights", **overrides) -> tuple[ModelConfig, dict]:
    """`(cfg, params)` from a flat dict of official tensors (names as stored in the file).

    `params` is our nested tree (`crate_jax.checkpoint.bundle.params_dict` layout, per-layer
    parameters stacked `[depth, ...]`) as numpy arrays in `cfg.param_dtype`.
    """
    layouts.check_format(fmt)
    tensors = layouts.normalise_names(fmt, tensors, source)
    cfg = layouts.infer_config(fmt, tensors, variant, source=source, **overrides)
    try:
        layouts.check_layout(fmt, tensors, cfg, source)
    except WeightsError as e:
        if variant:  # say first what the file holds, then the full list
            try:
                seen = layouts.infer_config(fmt, tensors, None, source=source, **overrides)
            except (WeightsError, ConfigError):
                seen = None
            if seen is not None and seen.variant != cfg.variant:
                raise WeightsError(f"variant {variant} does not fit {source}, whose shapes are those of "
                                   f"{layouts.describe(seen)}; drop --variant or pick the right one.\n{e}") from None
        raise
    params = layouts.to_params(fmt, tensors, cfg)
    _check_tree(cfg, params)
    return cfg, params


def import_weights(fmt: str, path: str | os.PathLike, variant: str | None = None,
                   **overrides) -> tuple[ModelConfig, dict]:
    """Reads an official weight file (`.pth`/`.pt`, `.npz`, `.safetensors`) of format `fmt`.

    `variant` (e.g. 'B/16') replaces the size read from the shapes; `overrides` replace any
    `ModelConfig` field (`pool='mean'`, `num_heads=...`, `image_size=...`, `param_dtype=...`).
    Raises `WeightsError` listing every missing, unexpected and mis-shaped tensor at once.
    """
    layouts.check_format(fmt)
    return import_tensors(fmt, read_tensors(path), variant, source=str(path), **overrides)


def _check_tree(cfg: ModelConfig, params: dict) -> None:
    """The mapped tree must be exactly the model's (same leaves, shapes, dtypes): a mismatch is a
    bug in the layout tables, caught here before anything is written."""
    want = {jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype))
            for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))}
    got = {jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype))
           for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise AssertionError(f"layout tables produced a tree that differs from the model at {diff}: "
                             f"model {[want.get(k) for k in diff]}, mapped {[got.get(k) for k in diff]}")


def count(params: dict) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
