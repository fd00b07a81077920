"""Masked reconstructions of a CRATE-MAE as PNGs: the original, the masked input, the reconstruction.

    python -m crate_jax.reconstruct --checkpoint DIR --images SOURCE --out OUTDIR
        [--max-images 8] [--mask-ratio 0.75] [--seed 0] [--mask M.npy] [--scale 4]

`--checkpoint` is a CRATE-MAE bundle (`crate_jax.convert --format crate-mae-torch`, `crate_jax.ssl.bundles`)
or a CRATE-MAE training workdir. SOURCE is a folder of images, an `.npy` array `[M, H, W, 3]` (uint8 or
float in [0, 1]), a scikit-image sample set (`skimage`), or the test split of a bundled digit set (`mnist`,
`digits`); images are resized to the model's resolution. Masks are the official random masks
(`--mask-ratio`, default the model's; `--seed`), or `--mask` a bool `[M, L]` array (True = removed).

Writes OUTDIR/NAME_original.png, NAME_masked.png, NAME_reconstruction.png per image and
OUTDIR/reconstructions.png (rows: images; columns: original, masked, reconstruction, reconstruction with
the visible patches pasted back), each upscaled `--scale`× (nearest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np


GRID = "reconstructions.png"  # the grid every run writes: marks a directory as an earlier output


def _digit_images(name: str, size: int, n: int):
    from PIL import Image

    from crate_jax.data.images import classification

    cfg = classification.resolve_config(dict(source=name))
    src = classification.make_source(cfg, "test")
    n = min(n, len(src))
    imgs = np.stack([np.asarray(Image.fromarray(src[i]["image"]).resize((size, size), Image.Resampling.BILINEAR))
                     for i in range(n)])
    return [f"{name}_test_{i}_label{int(src[i]['label'])}" for i in range(n)], imgs


def parse_args(argv=None):
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.reconstruct", __doc__)
    ap.add_argument("--checkpoint", required=True, help="CRATE-MAE bundle or training workdir")
    ap.add_argument("--images", required=True, help="image folder, image file, .npy array or a bundled sample set")
    ap.add_argument("--out", required=True, help="output directory (an earlier one of this command is replaced once "
                    "the new one is complete; a folder of other files is refused)")
    ap.add_argument("--max-images", type=int, default=8, help="reconstruct at most this many images")
    ap.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches removed (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random patch masks")
    ap.add_argument("--mask", default=None, help=".npy bool [M, L], True = removed (instead of random masks)")
    ap.add_argument("--scale", type=int, default=1, help="enlarge the picture by this integer factor")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from crate_jax import errors
    from crate_jax.analysis import samples
    from crate_jax.checkpoint.bundle import BundleError
    from crate_jax.checkpoint.outputs import atomic_output_dir, check_destination, check_output
    from crate_jax.errors import ConfigError
    from crate_jax.models.masking import mae_random_mask
    from crate_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from crate_jax.checkpoint.models import load
    from crate_jax.ssl.mae_inference import MaskError, check_mask, reconstruct, write_pngs

    args = parse_args(argv)
    try:
        if args.max_images < 1 or args.scale < 1:
            raise MaskError("--max-images and --scale must be >= 1")
        images_path = [args.images] if args.images not in ("mnist", "digits") and Path(args.images).exists() else []
        check_output(args.out, [args.checkpoint, args.mask] + images_path, flag="out")
        check_destination(args.out, directory=True, overwrite=True, flag="out", marker=GRID)
        cfg, model = load(args.checkpoint, kind="crate_mae")
        if args.images in ("mnist", "digits"):
            names, display = _digit_images(args.images, cfg.image_size, args.max_images)
        else:
            s = samples.load_images(args.images, cfg.image_size, max_images=args.max_images)
            names, display = list(s.names), s.display
        normalized = ((display.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
        if args.mask is not None:
            mask = check_mask(np.load(args.mask, allow_pickle=False), len(names), cfg.num_patches, args.mask)
        else:
            ratio = cfg.mask_ratio if args.mask_ratio is None else args.mask_ratio
            if not 0.0 <= ratio < 1.0:
                raise MaskError(f"--mask-ratio must be in [0, 1), got {ratio}")
            mask = np.asarray(mae_random_mask(jax.random.key(args.seed), len(names), cfg.num_patches, ratio))
        views = reconstruct(cfg, model, normalized, mask)
        with atomic_output_dir(args.out, overwrite=True) as tmp:  # a failure or a kill leaves the earlier one
            files = write_pngs(tmp, names, display, views, scale=args.scale, grid_name=GRID)
    except (MaskError, BundleError, ConfigError, samples.ImageSourceError, errors.UsageError, ValueError,
            OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"CRATE-MAE {cfg.variant}: {len(names)} images, {int(mask.sum())} of {mask.size} patches removed; "
          f"{len(files)} PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
