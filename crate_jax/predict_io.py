"""What `predict` and the other inference paths share, kept out of the command module: the error for inputs
that do not fit a model, a model at another input resolution, and atomic `.npy` writes of finite outputs."""

from __future__ import annotations

import os

import jax
import numpy as np

from crate_jax.checkpoint.bundle import model_from_params, params_dict
from crate_jax.checkpoint.outputs import atomic_file
from crate_jax.models import ImageClassifier, ModelConfig
from crate_jax.models.posemb import resample_2d


class PredictError(ValueError):
    """Images that do not fit the model; the message says what was expected and how to fix it."""


def at_resolution(cfg: ModelConfig, model: ImageClassifier, image_size: int, *, interpolate: bool,
                  source: str = "the checkpoint") -> tuple[ModelConfig, ImageClassifier]:
    """`(cfg, model)` for `image_size` px inputs: unchanged at the trained size; otherwise, with
    `interpolate`, the position embedding resampled on its 2-D grid (learned) or regenerated
    (sincos2d). Without `interpolate` a different size is a `PredictError`."""
    if image_size == cfg.image_size:
        return cfg, model
    if not interpolate:
        g, new_g = cfg.grid, image_size // cfg.patch_size
        raise PredictError(
            f"images are {image_size}x{image_size} px but {source} was trained at "
            f"{cfg.image_size}x{cfg.image_size} px; resize the images to {cfg.image_size} px, or pass "
            f"--interpolate-posemb to resample the position embedding from a {g}x{g} to a {new_g}x{new_g} grid")
    if image_size % cfg.patch_size:
        raise PredictError(f"images are {image_size} px, not a multiple of the patch size {cfg.patch_size}; "
                           f"crop or resize them to a multiple of {cfg.patch_size} px")
    new_cfg = cfg.replace(image_size=image_size)
    params = jax.tree.map(np.asarray, params_dict(model))
    if "pos_embedding" in params:  # sincos2d tables are computed from the config's grid
        pos = params["pos_embedding"]
        params["pos_embedding"] = resample_2d(pos, new_cfg.grid).astype(pos.dtype)
    return new_cfg, model_from_params(new_cfg, params)


def save_finite(path: str | os.PathLike, array: np.ndarray, what: str) -> None:
    """`save_array`, refused (nothing written) when the model gave NaN or inf `what`."""
    if not np.isfinite(array).all():
        raise PredictError(f"the model gave NaN or inf {what}; nothing written. With a bfloat16/float16 bundle, "
                           f"export it in float32 (export --dtype float32)")
    save_array(path, array)


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` to `path` atomically (a temporary sibling renamed into place), readable by others."""
    with atomic_file(path) as f:
        np.save(f, array)
