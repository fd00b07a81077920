"""CRATE-MAE inference outside training: checking a user's mask array and predicting patches in fixed-size
batches (used by `python -m crate_jax.predict --mask` and `python -m crate_jax.reconstruct`)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


class MaskError(ValueError):
    """A mask array that does not fit the images or the model; the message says what was expected."""


def check_mask(mask: np.ndarray, batch: int, length: int, path="mask") -> np.ndarray:
    """`mask` as bool `[batch, length]` (True = removed); bool or 0/1 integer arrays are accepted."""
    mask = np.asarray(mask)
    if mask.shape != (batch, length):
        raise MaskError(f"{path}: mask of shape {mask.shape}; expected [{batch}, {length}] (one row per image, one "
                        f"entry per patch, row-major over the patch grid)")
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
            raise MaskError(f"{path}: mask dtype {mask.dtype}; expected bool (True = removed) or 0/1 integers")
        mask = mask.astype(bool)
    return mask


def predict_patches(model, images: np.ndarray, mask: np.ndarray, *, layout: str = "NHWC",
                    batch_size: int = 64) -> np.ndarray:
    """Per-patch predictions `[B, L, P²·C]` (float32) of a `CrateMAE` for normalised `images` and `mask`.
    Compiled once: the last batch is zero-padded to the batch size."""
    from crate_jax.models.batch_apply import apply_in_batches

    graphdef, state = nnx.split(model)
    to_nhwc = (lambda x: x.transpose(0, 2, 3, 1)) if layout == "NCHW" else (lambda x: x)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(to_nhwc(x), m).astype(jax.numpy.float32))
    return apply_in_batches(lambda x, m: forward(state, x, m), [images, mask], batch_size, dtypes=[np.float32, bool])


def patches_to_images(patches: np.ndarray, grid: int, patch: int, channels: int = 3) -> np.ndarray:
    """Inverse of the official `patchify`: `[B, L, P²·C] -> [B, gP, gP, C]` (NHWC)."""
    B = patches.shape[0]
    x = patches.reshape(B, grid, grid, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, grid * patch, grid * patch, channels)


def reconstruct(cfg, model, normalized: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """`{'masked', 'reconstruction', 'pasted'}`, each uint8 `[B, S, S, 3]`, for normalised NHWC images: the
    input with removed patches grey, the decoder's image, and the decoder's image with the visible patches
    pasted back (the MAE paper's figure). With `norm_pix_loss` the predictions are per-patch normalised and
    are mapped back with each original patch's mean and std, as the MAE visualisation does."""
    from crate_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    pred = predict_patches(model, normalized, mask, layout="NHWC", batch_size=batch_size)
    P, g = cfg.patch_size, cfg.grid
    B = normalized.shape[0]
    target = normalized.reshape(B, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
    if cfg.norm_pix_loss:
        mean, var = target.mean(-1, keepdims=True), target.var(-1, ddof=1, keepdims=True)
        pred = pred * np.sqrt(var + 1e-6) + mean
    to_uint8 = lambda x: np.clip(np.round((x * IMAGENET_STD + IMAGENET_MEAN) * 255), 0, 255).astype(np.uint8)
    m = mask[..., None]
    grey = (np.float32(0.5) - IMAGENET_MEAN) / IMAGENET_STD  # mid-grey in normalised units
    masked = np.where(m, np.tile(grey, P * P)[None, None], target)
    return {"masked": to_uint8(patches_to_images(masked, g, P)),
            "reconstruction": to_uint8(patches_to_images(pred, g, P)),
            "pasted": to_uint8(patches_to_images(np.where(m, pred, target), g, P))}


def write_pngs(out_dir, names, original: np.ndarray, views: dict[str, np.ndarray], *, scale: int = 1,
               grid_name: str = "reconstructions.png") -> list:
    """Per image `NAME_{original,masked,reconstruction}.png`, and one grid (rows: images; columns: original,
    masked input, reconstruction, reconstruction with the visible patches pasted back). Returns the paths."""
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    up = lambda a: Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.Resampling.NEAREST)
    written = []
    columns = [original, views["masked"], views["reconstruction"], views["pasted"]]
    for i, name in enumerate(names):
        for tag, arr in (("original", original), ("masked", views["masked"]), ("reconstruction", views["reconstruction"])):
            p = out / f"{name}_{tag}.png"
            up(arr[i]).save(p)
            written.append(p)
    S = original.shape[1] * scale
    pad = max(2, scale)
    grid = Image.new("RGB", (4 * S + 5 * pad, len(names) * (S + pad) + pad), (255, 255, 255))
    for i in range(len(names)):
        for j, col in enumerate(columns):
            grid.paste(up(col[i]), (pad + j * (S + pad), pad + i * (S + pad)))
    grid.save(out / grid_name)
    written.append(out / grid_name)
    return written
