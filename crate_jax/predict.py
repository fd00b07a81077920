"""Classify images with a bundle, or score text / a token array with a language-model bundle.

    python -m crate_jax.predict --checkpoint bundles/B16 --images photos/ --output top5.json [--top-k 5]
    python -m crate_jax.predict --checkpoint bundles/B16 --images cat.jpg --output top5.csv
    python -m crate_jax.predict --checkpoint bundles/gpt --text "The with statement" --output next.json

    python -m crate_jax.predict --checkpoint bundles/B16 --images images.npy --layout NCHW \\
        --output logits.npy [--batch-size 64] [--interpolate-posemb]
    python -m crate_jax.predict --checkpoint bundles/crate_gpt --tokens tokens.npy --output logits.npy
    python -m crate_jax.predict --checkpoint bundles/mae_T16 --images X.npy --layout NCHW --mask M.npy --output pred.npy

`--images` is a folder of images (not searched recursively), one image file (.png, .jpg, ...), or a
`.npy` float array `[B, C, H, W]` (NCHW) or `[B, H, W, C]` (NHWC, `--layout` says which), already
normalised the way the model was trained (e.g. ImageNet mean/std). Image files are put through the
bundle's `preprocess.json` (its resize / centre-crop rule and mean / std; a bundle without one gets the
defaults of its config: short side to size / 0.875, centre crop, ImageNet mean / std).

The output follows `--output`'s extension: `.npy` holds the logits; `.json` holds for every input the
`--top-k` (default 5) likeliest classes with their names (the bundle's `class_names.json`, else the class
index) and softmax probabilities, and its logits; `.csv` one row per input and rank
(`crate_jax.predictions`). `--top-k-output FILE.json|FILE.csv` writes that table as well as a `.npy`
`--output`. `--text "..."` (language-model bundles) tokenises the text with the bundle's tokenizer; the
table lists the likeliest next tokens after the text, the `.npy` holds the logits `[1, T, V]`. The output is float32 logits `[B, classes]`
(pooled features `[B, d]` for a headless model). A resolution other than the bundle's is refused
unless `--interpolate-posemb` is given: a learned position embedding is then resampled on its 2-D
grid (docs/math.md §Position tables, `crate_jax.models.posemb.resample_2d`) and a sincos table is regenerated.

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
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from crate_jax.checkpoint import models
from crate_jax.checkpoint.bundle import BundleError
from crate_jax.checkpoint import files
from crate_jax import errors
from crate_jax.checkpoint.outputs import atomic_file
from crate_jax.checkpoint.outputs import check_destination, check_output
from crate_jax.cli import tool_parser
from crate_jax.models import ConfigError, ImageClassifier, registry
from crate_jax.models.batch_apply import apply_in_batches
from crate_jax.data.images.image_files import ImageFileError, is_image_path, load_for_model
from crate_jax.predictions import TABLE_SUFFIXES
from crate_jax.predict_io import PredictError, at_resolution, save_array, save_finite  # noqa: F401 - re-exported

LAYOUTS = ("NCHW", "NHWC")


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
    to_nhwc = (lambda x: x.transpose(0, 2, 3, 1)) if layout == "NCHW" else (lambda x: x)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(to_nhwc(x)).astype(jax.numpy.float32))
    return apply_in_batches(lambda x: forward(state, x), images, batch_size, dtypes=[np.float32])


def parse_args(argv=None) -> argparse.Namespace:
    ap = tool_parser("crate_jax.predict", __doc__)
    ap.add_argument("--checkpoint", required=True,
                    help="bundle directory (from crate_jax.convert or export), training workdir or export --format hf")
    ap.add_argument("--images", help="image folder, image file (.png, .jpg, ...), or .npy float array of normalised "
                                     "images (image classifiers)")
    ap.add_argument("--layout", choices=LAYOUTS, help="axis order of a .npy --images")
    ap.add_argument("--tokens", help=".npy int array of token ids [B, T] (language models)")
    ap.add_argument("--text", help="text to score with a language-model bundle (its tokenizer)")
    ap.add_argument("--top-k", type=int, default=5, help="classes (next tokens) per input in a .json / .csv table")
    ap.add_argument("--top-k-output", help=".json or .csv file for the top-k table next to a .npy --output")
    ap.add_argument("--mask", help=".npy bool array [B, L], True = removed patch (CRATE-MAE bundles)")
    ap.add_argument("--attention-mask", help=".npy 0/1 array [B, T], 1 = token, 0 = padding (masked-LM encoders; "
                                             "default all 1)")
    ap.add_argument("--token-types", help=".npy int array [B, T] of token types (masked-LM encoders; default 0)")
    ap.add_argument("--output", required=True, help=".npy: the float32 logits [B, classes]; .json / .csv: the top-k "
                                                    "table (class names and probabilities)")
    ap.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (the last batch is padded)")
    ap.add_argument("--interpolate-posemb", action="store_true",
                    help="accept another resolution by resampling the position embedding")
    return ap.parse_args(argv)


def check_args(args) -> None:
    """The command line alone: one input, a known output type, `--layout` for a `.npy` of images."""
    given = [f for f in ("images", "tokens", "text") if getattr(args, f) is not None]
    if len(given) != 1:
        raise PredictError("pass one of --images (image models), --tokens or --text (language models)")
    if args.images is not None and not is_image_path(args.images) and args.layout is None:
        raise PredictError("a .npy --images needs --layout NCHW or NHWC (image files and folders do not)")
    if Path(args.output).suffix.lower() not in (".npy",) + TABLE_SUFFIXES:
        raise PredictError(f"--output {args.output}: expected a .npy (logits), .json or .csv (top-k table) file")
    if args.top_k_output and Path(args.top_k_output).suffix.lower() not in TABLE_SUFFIXES:
        raise PredictError(f"--top-k-output {args.top_k_output}: expected a .json or .csv file")
    if args.top_k < 1:
        raise PredictError(f"--top-k must be >= 1, got {args.top_k}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # the outputs are checked before any model is loaded; an existing file is replaced
        check_args(args)
        for flag in ("output", "top_k_output"):
            if getattr(args, flag):
                check_output(getattr(args, flag), (args.checkpoint, args.images, args.tokens, args.mask,
                                                   args.attention_mask, args.token_types),
                             flag=flag.replace("_", "-"))
                check_destination(getattr(args, flag), directory=False, overwrite=True, flag=flag.replace("_", "-"))
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg, model = models.load(args.checkpoint)
        kind = registry.kind_of(cfg)
        if kind == "bert":  # masked-LM encoders: --tokens [--attention-mask] [--token-types]
            from crate_jax.mlm.inference import predict_main
            return predict_main(args, cfg, model)
        if args.tokens is not None or args.text is not None:
            return _predict_tokens(args, cfg, model)
        if kind == "crate_mae" or args.mask is not None:
            return _predict_mae(args, cfg, model)
        if kind != "classifier":
            raise PredictError(f"{args.checkpoint} holds a {kind!r} model; --images classifies with an image-classifier "
                               f"bundle (kind 'classifier')")
        names, images, layout = _read_images(args, cfg)
        size = image_size_of(images, layout, args.images)
        cfg, model = at_resolution(cfg, model, size, interpolate=args.interpolate_posemb,
                                   source=f"checkpoint {args.checkpoint}")
        logits = predict_logits(model, images, layout=layout, batch_size=args.batch_size)
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if bad.size:  # finite inputs and parameters, non-finite outputs: overflow in the model's dtype
            raise PredictError(f"the model gave NaN or inf for {bad.size} of {len(logits)} images (rows "
                               f"{bad[:10].tolist()}); nothing written. With a bfloat16/float16 bundle, export it "
                               f"in float32 (export --dtype float32)")
        labels = models.class_names_of(args.checkpoint)
        if labels is not None and len(labels) != logits.shape[1]:
            labels = None  # a headless bundle's features, or names of another head
        write_outputs(args, names, logits, labels)
    except (PredictError, BundleError, ConfigError, ImageFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model} {cfg.variant} at {cfg.image_size} px: logits {list(logits.shape)} -> {args.output}")
    return 0


def _read_images(args, cfg) -> tuple[list[str], np.ndarray, str]:
    """`(input names, images, layout)`: a `.npy` array as given, or image files through the bundle's
    preprocessing."""
    if not is_image_path(args.images):  # a .npy array (other files get read_npy's diagnosis)
        images = load_images(args.images, args.layout, cfg.channels)
        return [f"{Path(args.images).name}[{i}]" for i in range(images.shape[0])], images, args.layout
    spec = (models.preprocess_of(args.checkpoint) or {}).get("image")
    if spec is None:  # an old-format bundle: its config's defaults
        from crate_jax.checkpoint.describe import image_preprocess
        spec = image_preprocess(cfg)
    names, images = load_for_model(args.images, spec)
    return names, images, "NHWC"


def write_outputs(args, names: list[str], logits: np.ndarray, labels: list[str] | None) -> None:
    """`--output` by its extension (logits `.npy`, or the top-k table) and `--top-k-output` if given."""
    from crate_jax.predictions import render
    for path in (args.output, args.top_k_output):
        if not path:
            continue
        if Path(path).suffix.lower() == ".npy":
            save_array(path, logits)
        else:
            with atomic_file(path) as f:
                f.write(render(path, names, logits, labels, args.top_k))


def _predict_mae(args, cfg, model) -> int:
    """`--mask`: a CRATE-MAE bundle's per-patch predictions `[B, L, P²·C]`, written only if all are finite."""
    from crate_jax.ssl.mae_inference import MaskError, check_mask, predict_patches
    try:
        if registry.kind_of(cfg) != "crate_mae":
            raise PredictError(f"--mask needs a CRATE-MAE bundle (kind 'crate_mae'); {args.checkpoint} holds a "
                               f"{registry.kind_of(cfg)!r} model")
        if args.mask is None:
            raise PredictError(f"{args.checkpoint} is a CRATE-MAE bundle: pass --mask M.npy, a bool array [B, "
                               f"{cfg.num_patches}] with True for each removed patch (all False: none removed)")
        if Path(args.output).suffix.lower() != ".npy":
            raise PredictError(f"--output {args.output}: CRATE-MAE predictions are written as a .npy array")
        _, images, layout = _read_images(args, cfg)
        size = image_size_of(images, layout, args.images)
        if size != cfg.image_size:
            raise PredictError(f"images are {size}x{size} px but the CRATE-MAE bundle takes {cfg.image_size}x"
                               f"{cfg.image_size} px (its sincos tables are fixed to that grid); resize the images")
        mask = check_mask(read_npy(args.mask, "mask"), images.shape[0], cfg.num_patches, args.mask)
        pred = predict_patches(model, images, mask, layout=layout, batch_size=args.batch_size)
        save_finite(args.output, pred, "predictions")
    except (PredictError, MaskError, ImageFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"CRATE-MAE {cfg.variant} at {cfg.image_size} px: predictions {list(pred.shape)} -> {args.output}")
    return 0


def _predict_tokens(args, cfg, model) -> int:
    """`--tokens` / `--text`: float32 logits `[B, T, V]` of a language-model bundle, written only if all are
    finite; for `--text` (or a table output) the top-k next tokens after each sequence."""
    from crate_jax.lm.inference import TokenInputError, check_tokens, lm_logits, read_token_array
    from crate_jax.text.bpe import BPETokenizer, TokenizerError
    try:
        if registry.kind_of(cfg) != "lm":
            raise PredictError(f"{args.checkpoint} holds a {registry.kind_of(cfg)!r} model; --tokens / --text need a "
                               f"language-model bundle (kind 'lm'); use --images for image models")
        tok = None
        if args.text is not None:
            path = models.tokenizer_path(args.checkpoint)
            if path is None:
                raise PredictError(f"{args.checkpoint} carries no tokenizer (no tokenizer.json); pass --tokens with "
                                   f"ids made by the tokenizer the model was trained with")
            tok = BPETokenizer.load(path)
            tokens = check_tokens(np.asarray([tok.encode(args.text)], np.int32), cfg, "--text")
            names = [args.text]
        else:
            tokens = check_tokens(read_token_array(args.tokens), cfg, args.tokens)
            names = [f"{Path(args.tokens).name}[{i}]" for i in range(tokens.shape[0])]
        logits = lm_logits(model, tokens, batch_size=args.batch_size)
        if not np.isfinite(logits).all():
            save_finite(args.output, logits, "logits")  # refuses with the reason
        labels = _TokenNames(tok, cfg.vocab_size) if tok is not None else None
        if Path(args.output).suffix.lower() == ".npy":
            save_array(args.output, logits)
        tables = [p for p in (args.output, args.top_k_output) if p and Path(p).suffix.lower() in TABLE_SUFFIXES]
        if tables:
            from crate_jax.predictions import render
            for path in tables:  # the next token after each whole sequence
                with atomic_file(path) as f:
                    f.write(render(path, names, logits[:, -1], labels, args.top_k))
    except (PredictError, TokenInputError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model} {cfg.variant}: logits {list(logits.shape)} -> {args.output}")
    return 0


class _TokenNames:
    """Token id -> its text, decoded only for the ids a table shows."""

    def __init__(self, tok, n: int):
        self.tok, self.n = tok, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        return self.tok.decode([int(i)])


if __name__ == "__main__":
    errors.exit_with(main)
