"""Import official CRATE / CRATE-α weights into a crate_jax bundle.

    python -m crate_jax.convert --format crate-alpha-torch --input crate_alpha_B16.pth --output bundles/B16
    python -m crate_jax.convert --format crate-alpha-jax --input checkpoint.npz --output bundles/L14 [--variant L/14]
    python -m crate_jax.convert --format crate-torch --input crate_tiny.pth --output bundles/T16 [--pool mean]
    python -m crate_jax.convert --format clipa-jax --input clipa_l14_84.npz --output bundles/clipa_l14
    python -m crate_jax.convert --format crate-gpt-torch --input ckpt.pt --output bundles/crate_gpt [--heads 12]
    python -m crate_jax.convert --format gpt2-hf --input pytorch_model.bin --output bundles/gpt2
    python -m crate_jax.convert --format crate-bert-hf --input model.safetensors --output bundles/crate_bert
    python -m crate_jax.convert --format crate-mae-torch --input crate_mae_tiny.pth --output bundles/mae_T16
    python -m crate_jax.convert --format simdino-torch --input checkpoint.pth --output bundles/simdino_B16

Formats: `crate-torch` (CRATE state_dict, docs/weights.md §Layouts, also `{'state_dict': ...}` and `module.`-prefixed),
`crate-alpha-torch` (torch_inference state_dict, docs/weights.md §Layouts), `crate-alpha-jax` (big_vision `.npz` tree,
docs/weights.md §Layouts, with or without the `params/` prefix; bfloat16 stored as `|V2` is handled), `clipa-jax`
(a CLIPA two-tower big_vision checkpoint, docs/math.md §CLIPA), and the language models of
`crate_jax.weights.gpt`: `crate-gpt-torch` (CRATE-GPT, docs/math.md §Language models) and `gpt2-hf` (a Hugging Face GPT-2
state_dict, Conv1D weights `[in, out]`), and `crate-mae-torch` (the official `model/crate_ae`
CRATE-MAE state_dict, docs/math.md §CRATE-MAE, `crate_jax.weights.crate_mae`), and `simdino-torch` / `dino-torch`
(a SimDINO / DINO checkpoint or backbone state dict: the teacher's ViT backbone as a headless classifier
bundle, `crate_jax.weights.dino`). File types:
`.pth`/`.pt` (needs torch), `.npz`, `.safetensors`.

The model config is read from the shapes (`crate_jax.weights.layouts.infer_config`); every tensor
is checked before anything is written, and the bundle is written atomically, so an error never
leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path

from crate_jax import errors
from crate_jax.checkpoint import models
from crate_jax.checkpoint.bundle import BundleError
from crate_jax.checkpoint.outputs import check_destination, check_output
from crate_jax.cli import tool_parser
from crate_jax.models import ConfigError
from crate_jax.weights import bert, clipa, crate_mae, dino, gpt, layouts
from crate_jax.weights.importer import count, import_weights
from crate_jax.weights.readers import WeightsError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_args(argv=None) -> argparse.Namespace:
    ap = tool_parser("crate_jax.convert", __doc__)
    ap.add_argument("--format", required=True,
                    choices=sorted(layouts.FORMATS) + [CLIPA_FORMAT] + sorted(gpt.LM_FORMATS) + [crate_mae.FORMAT]
                    + list(dino.FORMATS) + sorted(bert.FORMATS),
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
    ap.add_argument("--license", default=None,
                    help="the licence of the source weights, recorded in the bundle's model card (README.md)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output directory (swapped in only once the new bundle is complete)")
    ap.add_argument("--keep-old", action="store_true",
                    help="with --overwrite: keep the replaced bundle beside the new one as NAME.old-STAMP")
    return ap.parse_args(argv)


CLIPA_FORMAT = "clipa-jax"


def _tokenizer_beside(args) -> list[Path] | None:
    """A language model's tokenizer files next to the input (Hugging Face's directory layout), if any: they
    are copied into the bundle."""
    if args.format not in gpt.LM_FORMATS and args.format not in bert.FORMATS:
        return None
    here = Path(args.input).parent
    if (here / "tokenizer.json").is_file():
        return [here / "tokenizer.json"]
    pair = [here / "vocab.json", here / "merges.txt"]
    return pair if all(f.is_file() for f in pair) else None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    try:
        if args.keep_old and not args.overwrite:
            raise errors.UsageError("--keep-old keeps the bundle that --overwrite replaces; pass both")
        check_output(out, (args.input,))
        check_destination(out, directory=True, overwrite=args.overwrite)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in dict(num_heads=args.heads, pool=args.pool, image_size=args.image_size,
                                       posemb=args.posemb).items() if v is not None}
    try:
        if args.format == CLIPA_FORMAT:  # two towers (docs/math.md §CLIPA layout); sizes are read from the shapes
            cfg, params = clipa.import_clipa(args.input)
            what = (f"CLIPA two-tower: image {layouts.describe(cfg.image)}; text {cfg.text.variant} (width "
                    f"{cfg.text.width}, depth {cfg.text.depth}, {cfg.text.num_heads} heads, {cfg.text.max_len} tokens)")
        elif args.format in gpt.LM_FORMATS:  # sizes from the shapes; heads from the size table or --heads
            cfg, params = gpt.import_lm(args.format, args.input, heads=args.heads)
            what = gpt.describe(cfg)
        elif args.format in bert.FORMATS:  # masked-LM encoders; heads from the size table or --heads
            cfg, params = bert.import_bert(args.format, args.input, heads=args.heads)
            what = bert.describe(cfg)
        elif args.format == crate_mae.FORMAT:  # sizes from the shapes; heads from the preset table or --heads
            cfg, params = crate_mae.import_crate_mae(args.input, **({"num_heads": args.heads} if args.heads else {}))
            what = (f"CRATE-MAE {cfg.variant} (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, patch "
                    f"{cfg.patch_size}, {cfg.image_size} px)")
        elif args.format in dino.FORMATS:  # the teacher's backbone, a headless DINO-flavour ViT (weights/dino.py)
            cfg, params = dino.import_dino(args.input, num_heads=args.heads)
            what = f"{args.format} teacher backbone: {layouts.describe(cfg)}"
        else:
            cfg, params = import_weights(args.format, args.input, args.variant, **overrides)
            what = layouts.describe(cfg)
        source = f"{args.format}:{Path(args.input).name}"
        models.save(params, cfg, out, source=source, overwrite=args.overwrite, keep_old=args.keep_old,
                    extra={"source_sha256": _sha256(Path(args.input))}, tokenizer=_tokenizer_beside(args),
                    card={"converted_with": "python -m crate_jax.convert " + shlex.join(sys.argv[1:] if argv is None
                                                                                          else list(argv)),
                          "license": args.license})
    except (WeightsError, ConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {what}\n  {count(params):,} parameters from {args.input}\n  bundle: {out}")
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
