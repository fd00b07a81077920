"""Classify a normalised image array with a bundle, or score a token array with a language-model bundle.

    python -m crate_jax.predict --checkpoint bundles/B16 --images images.npy --layout NCHW \\
        --output logits.npy [--batch-size 64] [--interpolate-posemb]
    python -m crate_jax.predict --checkpoint bundles/crate_gpt --tokens tokens.npy --output logits.npy
    python -m crate_jax.predict --checkpoint bundles/mae_T16 --images X.npy --layout NCHW --mask M.npy --output pred.npy

`--images` is a float array `[B, C, H, W]` (NCHW) or `[B, H, W, C]` (NHWC), already normalised the
way the model was trained (e.g. ImageNet mean/std). The output is float32 logits `[B, classes]`
(pooled features `[B, d]` for a headless model). A resolution other than the bundle's is refused
unless `--interpolate-posemb` is given: a learned position embedding is then resampled on its 2-D
grid (SPEC §2.6, `crate_jax.models.posemb.resample_2d`) and a sincos table is regenerated.

`--tokens` (language-model bundles, `crate_jax.models.lm`) is an integer array `[B, T]` with
`T <= block_size` and ids below the vocabulary size; the output is float32 logits `[B, T, V]`.

`--mask` (CRATE-MAE bundles, `crate_jax.models.mae`) is a bool array `[B, L]` (True = removed patch,
L = number of patches); the output is the float32 per-patch predictions `[B, L, P²·C]`
(`crate_jax.ssl.mae_inference`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from flax import nnx

from crate_jax.checkpoint.bundle import BundleError, load_bundle, params_dict
from crate_jax.checkpoint import files
from crate_jax.checkpoint.files import atomic_file
from crate_jax.models import ConfigError, ImageClassifier, ModelConfig, build_model
from crate_jax.models.posemb import resample_2d

LAYOUTS = ("NCHW", "NHWC")


class PredictError(ValueError):
    """Images that do not fit the model; the message says what was expected and how to fix it."""


def model_from_params(cfg: ModelConfig, params: dict) -> ImageClassifier:
    """A model with config `cfg` holding `params` (nested dict as `params_dict` returns); no random
    init is run. Shapes must match the config exactly."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state, rest)


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


def load_images(path: str | os.PathLike, layout: str, channels: int) -> np.ndarray:
    """The image array of `path` (memory-mapped), checked: 4-D, floating point, `channels` channels.
    Returned in its stored layout; `predict_logits` converts per batch."""
    if layout not in LAYOUTS:
        raise PredictError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    images = read_npy(path, "images")
    if images.ndim != 4:
        raise PredictError(f"{path}: expected a 4-D {layout} array, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise PredictError(f"{path}: dtype {images.dtype}; expected float images already normalised as in "
                           f"training (e.g. (x/255 - mean)/std), not raw pixels")
    c = images.shape[1] if layout == "NCHW" else images.shape[3]
    if c != channels:
        raise PredictError(f"{path}: shape {images.shape} read as {layout} has {c} channels, the model takes "
                           f"{channels}; check --layout")
    if images.shape[0] == 0:
        raise PredictError(f"{path}: holds no images (shape {images.shape})")
    check_finite_rows(images, path)
    return images


def read_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """`--images` / `--mask`: `crate_jax.checkpoint.files.read_npy` raising PredictError."""
    return files.read_npy(path, what, what, PredictError)


def check_finite_rows(array: np.ndarray, path, chunk: int = 256) -> None:
    """Every row of a (possibly memory-mapped) float array is finite, else a `PredictError` naming rows."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = []
    for s in range(0, array.shape[0], chunk):
        rows = np.asarray(array[s:s + chunk]).reshape(min(chunk, array.shape[0] - s), -1)
        bad += list(s + np.flatnonzero(~np.isfinite(rows).all(axis=1)))
    if bad:
        raise PredictError(f"{path}: {len(bad)} of {array.shape[0]} rows hold NaN or inf (rows "
                           f"{[int(b) for b in bad[:10]]}{' ...' if len(bad) > 10 else ''}); fix the input")


def image_size_of(images: np.ndarray, layout: str, path="images") -> int:
    h, w = (images.shape[2], images.shape[3]) if layout == "NCHW" else (images.shape[1], images.shape[2])
    if h != w:
        raise PredictError(f"{path}: images are {h}x{w} px; the models take square images (crop them)")
    return int(h)


def predict_logits(model: ImageClassifier, images: np.ndarray, *, layout: str = "NHWC",
                   batch_size: int = 64) -> np.ndarray:
    """Model outputs `[B, classes]` (float32) for `images` `[B, C, H, W]` or `[B, H, W, C]`.

    The forward is jitted once: the last batch is zero-padded to the batch size so every call
    has the same shape."""
    if batch_size < 1:
        raise PredictError(f"batch size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    n = images.shape[0]
    bs = max(1, min(batch_size, n))
    outs = []
    for start in range(0, n, bs):
        x = np.asarray(images[start:start + bs], np.float32)
        if layout == "NCHW":
            x = x.transpose(0, 2, 3, 1)
        real = x.shape[0]
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], x.dtype)])
        outs.append(np.asarray(forward(state, x))[:real])
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m crate_jax.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="bundle directory (from crate_jax.convert or export)")
    ap.add_argument("--images", help=".npy float array of normalised images (image classifiers)")
    ap.add_argument("--layout", choices=LAYOUTS, help="axis order of --images")
    ap.add_argument("--tokens", help=".npy int array of token ids [B, T] (language models)")
    ap.add_argument("--mask", help=".npy bool array [B, L], True = removed patch (CRATE-MAE bundles)")
    ap.add_argument("--output", required=True, help=".npy file for the float32 logits [B, classes]")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--interpolate-posemb", action="store_true",
                    help="accept another resolution by resampling the position embedding")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.images is None) == (args.tokens is None):
        print("error: pass --images (image classifiers) or --tokens (language models), not both", file=sys.stderr)
        return 2
    if args.images is not None and args.layout is None:
        print("error: --images needs --layout NCHW or NHWC", file=sys.stderr)
        return 2
    try:
        cfg, model = load_bundle(args.checkpoint)
        if args.tokens is not None:
            return _predict_tokens(args, cfg, model)
        from crate_jax.models.mae import MAEConfig
        if isinstance(cfg, MAEConfig) or args.mask is not None:
            return _predict_mae(args, cfg, model, MAEConfig)
        if not isinstance(cfg, ModelConfig):
            raise PredictError(f"{args.checkpoint} holds a {type(cfg).__name__} (bundle kind "
                               f"{type(cfg).kind!r}); --images classifies with an image-classifier bundle")
        images = load_images(args.images, args.layout, cfg.channels)
        size = image_size_of(images, args.layout, args.images)
        cfg, model = at_resolution(cfg, model, size, interpolate=args.interpolate_posemb,
                                   source=f"checkpoint {args.checkpoint}")
        logits = predict_logits(model, images, layout=args.layout, batch_size=args.batch_size)
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if bad.size:  # finite inputs and parameters, non-finite outputs: overflow in the model's dtype
            raise PredictError(f"the model gave NaN or inf for {bad.size} of {len(logits)} images (rows "
                               f"{bad[:10].tolist()}); nothing written. With a bfloat16/float16 bundle, export it "
                               f"in float32 (export --dtype float32)")
        save_array(args.output, logits)
    except (PredictError, BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model} {cfg.variant} at {cfg.image_size} px: logits {list(logits.shape)} -> {args.output}")
    return 0


def _predict_mae(args, cfg, model, mae_config_cls) -> int:
    """`--mask`: a CRATE-MAE bundle's per-patch predictions `[B, L, P²·C]`, written only if all are finite."""
    from crate_jax.ssl.mae_inference import MaskError, check_mask, predict_patches
    try:
        if not isinstance(cfg, mae_config_cls):
            raise PredictError(f"--mask needs a CRATE-MAE bundle (kind 'crate_mae'); {args.checkpoint} holds a "
                               f"{type(cfg).__name__} (kind {type(cfg).kind!r})")
        if args.mask is None:
            raise PredictError(f"{args.checkpoint} is a CRATE-MAE bundle: pass --mask M.npy, a bool array [B, "
                               f"{cfg.num_patches}] with True for each removed patch (all False: none removed)")
        images = load_images(args.images, args.layout, cfg.channels)
        size = image_size_of(images, args.layout, args.images)
        if size != cfg.image_size:
            raise PredictError(f"images are {size}x{size} px but the CRATE-MAE bundle takes {cfg.image_size}x"
                               f"{cfg.image_size} px (its sincos tables are fixed to that grid); resize the images")
        mask = check_mask(read_npy(args.mask, "mask"), images.shape[0], cfg.num_patches, args.mask)
        pred = predict_patches(model, images, mask, layout=args.layout, batch_size=args.batch_size)
        save_finite(args.output, pred, "predictions")
    except (PredictError, MaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"CRATE-MAE {cfg.variant} at {cfg.image_size} px: predictions {list(pred.shape)} -> {args.output}")
    return 0


def _predict_tokens(args, cfg, model) -> int:
    """`--tokens`: float32 logits `[B, T, V]` of a language-model bundle, written only if all are finite."""
    from crate_jax.lm.inference import TokenInputError, check_tokens, lm_logits, read_token_array
    from crate_jax.models.lm import LMConfig
    try:
        if not isinstance(cfg, LMConfig):
            raise PredictError(f"{args.checkpoint} holds a {type(cfg).__name__} (bundle kind {type(cfg).kind!r}); "
                               f"--tokens needs a language-model bundle (kind 'lm'); use --images for classifiers")
        tokens = check_tokens(read_token_array(args.tokens), cfg, args.tokens)
        logits = lm_logits(model, tokens, batch_size=args.batch_size)
        save_finite(args.output, logits, "logits")
    except (PredictError, TokenInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model} {cfg.variant}: logits {list(logits.shape)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
