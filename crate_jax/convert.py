"""Import official CRATE / CRATE-α weights into a crate_jax bundle.

    python -m crate_jax.convert --format crate-alpha-torch --input crate_alpha_B16.pth --output bundles/B16
    python -m crate_jax.convert --format crate-alpha-jax --input checkpoint.npz --output bundles/L14 [--variant L/14]
    python -m crate_jax.convert --format crate-torch --input crate_tiny.pth --output bundles/T16 [--pool mean]
    python -m crate_jax.convert --format clipa-jax --input clipa_l14_84.npz --output bundles/clipa_l14
    python -m crate_jax.convert --format crate-gpt-torch --input ckpt.pt --output bundles/crate_gpt [--heads 12]
    python -m crate_jax.convert --format gpt2-hf --input pytorch_model.bin --output bundles/gpt2
    python -m crate_jax.convert --format crate-mae-torch --input crate_mae_tiny.pth --output bundles/mae_T16

Formats: `crate-torch` (CRATE state_dict, SPEC §1.6, also `{'state_dict': ...}` and `module.`-prefixed),
`crate-alpha-torch` (torch_inference state_dict, SPEC §2.5), `crate-alpha-jax` (big_vision `.npz` tree,
SPEC §2.4, with or without the `params/` prefix; bfloat16 stored as `|V2` is handled), `clipa-jax`
(a CLIPA two-tower big_vision checkpoint, SPEC §3.1), and the language models of
`crate_jax.weights.gpt`: `crate-gpt-torch` (CRATE-GPT, SPEC §5) and `gpt2-hf` (a Hugging Face GPT-2
state_dict, Conv1D weights `[in, out]`), and `crate-mae-torch` (the official `model/crate_ae`
CRATE-MAE state_dict, SPEC §4, `crate_jax.weights.crate_mae`). File types:
`.pth`/`.pt` (needs torch), `.npz`, `.safetensors`.

The model config is read from the shapes (`crate_jax.weights.layouts.infer_config`); every tensor
is checked before anything is written, and the bundle is written atomically, so an error never
leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from crate_jax.checkpoint.bundle import BundleError, save_bundle
from crate_jax.models import ConfigError
from crate_jax.weights import clipa, crate_mae, gpt, layouts
from crate_jax.weights.importer import count, import_weights
from crate_jax.weights.readers import WeightsError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m crate_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True,
                    choices=sorted(layouts.FORMATS) + [CLIPA_FORMAT] + sorted(gpt.LM_FORMATS) + [crate_mae.FORMAT],
                    help=f"layout of the input file ({CLIPA_FORMAT}: a CLIPA two-tower big_vision checkpoint; "
                         f"{', '.join(sorted(gpt.LM_FORMATS))}: language models)")
    ap.add_argument("--input", required=True, help="weight file: .pth/.pt (needs torch), .npz or .safetensors")
    ap.add_argument("--output", required=True, help="bundle directory to create")
    ap.add_argument("--variant", help="size name such as B/16 (default: read from the shapes)")
    ap.add_argument("--heads", type=int, help="number of heads, for sizes outside the variant tables "
                    "(the torch layouts do not record it)")
    ap.add_argument("--pool", choices=["cls", "mean"], help="CRATE pooling (not recorded in the weights; default cls)")
    ap.add_argument("--image-size", type=int, help="image size when the weights do not fix it (sincos posemb)")
    ap.add_argument("--posemb", choices=["learn", "sincos2d"], help="default: sincos2d iff the file has no "
                    "pos_embedding (crate-alpha-jax)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return ap.parse_args(argv)


CLIPA_FORMAT = "clipa-jax"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        print(f"error: output {out} is a file; the output is a bundle directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: output {out} exists and is not an empty directory; choose a new directory or pass "
              f"--overwrite", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in dict(num_heads=args.heads, pool=args.pool, image_size=args.image_size,
                                       posemb=args.posemb).items() if v is not None}
    try:
        if args.format == CLIPA_FORMAT:  # two towers (SPEC §3.1 layout); sizes are read from the shapes
            cfg, params = clipa.import_clipa(args.input)
            what = (f"CLIPA two-tower: image {layouts.describe(cfg.image)}; text {cfg.text.variant} (width "
                    f"{cfg.text.width}, depth {cfg.text.depth}, {cfg.text.num_heads} heads, {cfg.text.max_len} tokens)")
        elif args.format in gpt.LM_FORMATS:  # sizes from the shapes; heads from the size table or --heads
            cfg, params = gpt.import_lm(args.format, args.input, heads=args.heads)
            what = gpt.describe(cfg)
        elif args.format == crate_mae.FORMAT:  # sizes from the shapes; heads from the preset table or --heads
            cfg, params = crate_mae.import_crate_mae(args.input, **({"num_heads": args.heads} if args.heads else {}))
            what = (f"CRATE-MAE {cfg.variant} (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, patch "
                    f"{cfg.patch_size}, {cfg.image_size} px)")
        else:
            cfg, params = import_weights(args.format, args.input, args.variant, **overrides)
            what = layouts.describe(cfg)
        source = f"{args.format}:{Path(args.input).name}"
        save_bundle(out, cfg, params, source=source, overwrite=args.overwrite,
                    extra={"source_sha256": _sha256(Path(args.input))})
    except (WeightsError, ConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {what}\n  {count(params):,} parameters from {args.input}\n  bundle: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
