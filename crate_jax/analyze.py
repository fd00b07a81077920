"""White-box analysis of a CRATE / CRATE-α (or ViT) classifier bundle, or of a language-model bundle.

    python -m crate_jax.analyze --checkpoint DIR --images SOURCE --out OUTDIR
        [--max-images N] [--batch-size B] [--layers 0,5,-1] [--paper-eps 0.5] [--official-eps-sq 0.01]
        [--precision float64|float32] [--compare-init] [--max-plots 8] [--attention-layer -1]
        [--cut-feature mssa|out]
        [--num-objects 3] [--tau 0.2] [--mass 0.6] [--crop-fraction 1.0]

SOURCE is a folder of images, an `.npy` array `[M, H, W, 3]` (uint8, or float in [0, 1]), or a bundled
sample set (`skimage`, `skimage-objects`: photos shipped with scikit-image, so it works offline).

Language models (CRATE-GPT, CRATE-α LM, GPT-2): `--tokens FILE.npy` instead of `--images`, an int array
`[M, T]` of sequences (or a 1-D token stream, e.g. a shard of `crate_jax.data.tokens.prepare`, cut into
blocks); `--max-images` caps the sequences. The same per-layer measurements, on token positions
(`crate_jax.analysis.lm_measure`); analysis.json, meta.json and rate_reduction.png are written.

Writes:
  OUTDIR/analysis.json        one entry per layer: {"layer", "compression", "compression_std", "sparsity",
                              "sparsity_std", "zero_fraction", ..., "paper_compression", "paper_coding_rate",
                              "paper_sparsity", ...}; see `crate_jax.analysis.measure` for each key
  OUTDIR/analysis_init.json   (with --compare-init) the same for the architecture at initialisation
  OUTDIR/meta.json            model config, image source, constants and the definitions of the keys
  OUTDIR/rate_reduction.png   per-layer compression and sparsity curves
  OUTDIR/images/NAME/attention.png   cls-token attention of every head over the image
  OUTDIR/images/NAME/pca.png         PCA of the patch features as RGB
  OUTDIR/images/NAME/threshold.png   per-head masks holding `--mass` of the attention
  OUTDIR/images/NAME/maskcut.png     MaskCut-style normalized-cut objects
  OUTDIR/images/NAME/masks.npz       the masks on the patch grid (`threshold [K, g, g]`, `maskcut [n, g, g]`)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from crate_jax.analysis import measure, plots, samples, segmentation
from crate_jax.analysis.samples import ImageSourceError
from crate_jax.cli import tool_parser

PER_IMAGE_FILES = ("attention.png", "pca.png", "threshold.png", "maskcut.png", "masks.npz")


class AnalyzeError(ValueError):
    """A bad command-line input; the message says what to change."""


def _log(msg: str) -> None:
    print(f"[analyze] {msg}", file=sys.stderr, flush=True)


def parse_layers(text: str | None) -> list[int] | None:
    """`'0,5,-1'` -> `[0, 5, -1]`; None or '' -> None (all layers)."""
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise AnalyzeError(f"--layers: expected comma-separated integers such as '0,5,-1', got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("crate_jax.analyze", __doc__)
    p.add_argument("--checkpoint", required=True, help="bundle directory (model.json + params/)")
    p.add_argument("--images",
                   help=f"folder of images, .npy array, or sample set ({', '.join(sorted(samples.SAMPLE_SETS))})")
    p.add_argument("--tokens", help="language models: .npy int tokens [M, T] (or a 1-D stream, cut into blocks)")
    p.add_argument("--out", required=True, help="output directory (created; an earlier analysis there is replaced "
                   "once the new one is complete; a folder of other files is refused)")
    p.add_argument("--max-images", type=int, default=None, help="measure at most this many images")
    p.add_argument("--batch-size", type=int, default=16, help="images or sequences per forward pass")
    p.add_argument("--layers", default=None, help="comma-separated layer indices for analysis.json (default all)")
    p.add_argument("--paper-eps", type=float, default=measure.PAPER_EPS, help="ε of the paper-form rates")
    p.add_argument("--official-eps-sq", type=float, default=measure.OFFICIAL_EPS_SQ,
                   help="the official measurement's ε² (0.01 in CRATE's code)")
    p.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="dtype of the Gram / Cholesky rate computation (the forward pass keeps the model's dtype)")
    p.add_argument("--compare-init", action="store_true",
                   help="also measure the same architecture at initialisation (dashed curves, analysis_init.json)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the randomly initialised copy (--compare-init)")
    p.add_argument("--max-plots", type=int, default=8, help="per-image pictures for the first N images (0: none)")
    p.add_argument("--attention-layer", type=int, default=-1, help="layer of the attention maps and features")
    p.add_argument("--cut-feature", choices=("mssa", "out"), default="mssa",
                   help="patch features for PCA and MaskCut: the layer's attention projections or its output")
    p.add_argument("--num-objects", type=int, default=3, help="MaskCut objects per image")
    p.add_argument("--tau", type=float, default=0.2, help="MaskCut cosine-similarity threshold")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass kept by the threshold masks")
    p.add_argument("--crop-fraction", type=float, default=1.0,
                   help="resize the short side to image_size / f, then centre-crop (0.875: ImageNet eval)")
    return p


def _validate(args) -> None:
    for name in ("batch_size", "num_objects"):
        if getattr(args, name) < 1:
            raise AnalyzeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_images is not None and args.max_images < 1:
        raise AnalyzeError(f"--max-images must be >= 1, got {args.max_images}")
    if args.max_plots < 0:
        raise AnalyzeError(f"--max-plots must be >= 0, got {args.max_plots}")
    if args.paper_eps <= 0 or args.official_eps_sq <= 0:
        raise AnalyzeError("--paper-eps and --official-eps-sq must be positive")
    if not 0.0 < args.mass <= 1.0:
        raise AnalyzeError(f"--mass must be in (0, 1], got {args.mass}")
    if not 0.0 < args.crop_fraction <= 1.0:
        raise AnalyzeError(f"--crop-fraction must be in (0, 1], got {args.crop_fraction}")
    if not -1.0 <= args.tau < 1.0:
        raise AnalyzeError(f"--tau is a cosine similarity in [-1, 1), got {args.tau}")


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    clean = _finite_or_none(obj)
    if clean != obj:
        _log(f"warning: non-finite values written as null in {path.name} (overflow or NaN in the model?)")
    path.write_text(json.dumps(clean, indent=2) + "\n")


def load_classifier(directory: str):
    """`(cfg, model)` of an image classifier (`crate_jax.load`: a bundle, training workdir or exported
    directory; a SimDINO student / teacher: its backbone), with errors that name the directory."""
    from crate_jax.checkpoint import models
    from crate_jax.models import registry

    path = Path(directory)
    if not path.is_dir():
        raise AnalyzeError(f"checkpoint directory {directory} does not exist (expected a bundle written by "
                           f"crate_jax.convert or crate_jax.export: model.json + params/)")
    cfg = models.config_of(path)
    detachable = registry.lookup(registry.kind_of(cfg)).backbone is not None
    try:
        return models.load(path, kind="classifier", backbone=detachable)
    except models.KindError as e:
        raise AnalyzeError(f"{e}; analyze needs a CRATE, CRATE-α or ViT classifier (or a SimDINO model: its "
                           f"backbone)") from e


def per_image_pictures(model, images: samples.ImageSet, out_dir: Path, args) -> list[Path]:
    """Writes the four pictures and the masks of each of the first `args.max_plots` images."""
    n = min(args.max_plots, len(images))
    if n == 0:
        return []
    cfg = model.cfg
    layer = measure.check_layers([args.attention_layer], cfg.depth)[0]
    attn, feats = measure.attention_and_features(model, images.normalized[:n], layer=layer, feature=args.cut_feature,
                                                 batch_size=args.batch_size)
    g, k = cfg.grid, attn.shape[1]
    written = []
    for i in range(n):
        name, image = images.names[i], images.display[i]
        d = out_dir / "images" / name
        d.mkdir(parents=True, exist_ok=True)
        a = attn[i]  # [K, N]
        tag = f"{name} · {cfg.model} {cfg.variant} · layer {layer}"
        written.append(plots.plot_attention_heads(image, a.reshape(k, g, g), d / "attention.png",
                                                  title=f"cls-token attention per head · {tag}"))
        written.append(plots.plot_pca(image, segmentation.pca_rgb(feats[i], g), d / "pca.png",
                                      title=f"PCA of patch features ({args.cut_feature}) · {tag}"))
        thr = segmentation.threshold_attention(a, args.mass).reshape(k, g, g)
        written.append(plots.plot_threshold_masks(image, thr, d / "threshold.png", mass=args.mass,
                                                  title=f"attention thresholded to {args.mass:.0%} mass · {tag}"))
        cuts = segmentation.maskcut(feats[i], args.num_objects, tau=args.tau, grid=g)
        written.append(plots.plot_maskcut(image, cuts, d / "maskcut.png",
                                          title=f"normalized cuts (τ={args.tau:g}, {args.cut_feature}) · {tag}"))
        cut_arr = np.stack(cuts) if cuts else np.zeros((0, g, g), bool)
        np.savez_compressed(d / "masks.npz", threshold=thr, maskcut=cut_arr, patch_size=cfg.patch_size)
        written.append(d / "masks.npz")
        _log(f"pictures {i + 1}/{n}: {d}")
    return written


def format_rows(rows: list[dict]) -> str:
    def f(v, spec):  # spec like '12.3f'; a missing value is a right-aligned '-'
        return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)

    lines = [f"{'layer':>5} {'compression':>12} {'± std':>8} {'sparsity':>9} {'± std':>8} "
             f"{'paper R^c':>10} {'paper R':>9}"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {f(r['compression'], '12.3f')} {f(r['compression_std'], '8.3f')} "
                     f"{f(r['sparsity'], '9.4f')} {f(r['sparsity_std'], '8.4f')} "
                     f"{f(r['paper_compression'], '10.3f')} {f(r['paper_coding_rate'], '9.3f')}")
    return "\n".join(lines)


def run(args) -> dict:
    """Runs the analysis for parsed `args`; returns `{'rows': [...], 'files': [Path, ...]}`."""
    _validate(args)
    if (args.images is None) == (args.tokens is None):
        raise AnalyzeError("pass --images (image classifiers) or --tokens (language models), not both")
    if args.tokens is not None:
        return run_tokens(args)
    t0 = time.perf_counter()
    cfg, model = load_classifier(args.checkpoint)
    _log(f"loaded {cfg.model} {cfg.variant} (depth {cfg.depth}, {cfg.num_heads} heads, {cfg.image_size} px) "
         f"from {args.checkpoint}")
    try:
        layers = measure.check_layers(parse_layers(args.layers), cfg.depth)
        measure.check_layers([args.attention_layer], cfg.depth)
    except ValueError as e:
        raise AnalyzeError(f"--layers / --attention-layer: {e}") from e
    images = samples.load_images(args.images, cfg.image_size, max_images=args.max_images,
                                 crop_fraction=args.crop_fraction)
    _log(f"{len(images)} image(s) from {args.images}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(batch_size=args.batch_size, paper_eps=args.paper_eps, official_eps_sq=args.official_eps_sq,
              precision=args.precision)
    rows = measure.measure_model(model, images.normalized, layers=layers, progress=_log, **kw)
    files = [out / "analysis.json", out / "meta.json", out / "rate_reduction.png"]
    _write_json(out / "analysis.json", rows)
    init_rows = None
    if args.compare_init:
        from crate_jax.models import build_model

        _log(f"measuring the same architecture at initialisation (seed {args.init_seed})")
        init_rows = measure.measure_model(build_model(cfg, args.init_seed), images.normalized, layers=layers,
                                          progress=_log, **kw)
        _write_json(out / "analysis_init.json", init_rows)
        files.append(out / "analysis_init.json")
    meta = {
        "checkpoint": str(args.checkpoint), "images": str(args.images), "num_images": len(images),
        "image_names": list(images.names), "model": cfg.to_dict(), "paper_eps": args.paper_eps,
        "official_eps_sq": args.official_eps_sq, "precision": args.precision, "layers": layers,
        "attention_layer": args.attention_layer,
        "cut_feature": args.cut_feature, "tau": args.tau, "mass": args.mass, "num_objects": args.num_objects,
        "definitions": measure.__doc__,
    }
    _write_json(out / "meta.json", meta)
    plots.plot_rate_reduction(rows, out / "rate_reduction.png", init_rows=init_rows, paper_eps=args.paper_eps,
                              official_eps_sq=args.official_eps_sq,
                              title=f"{cfg.model} {cfg.variant} · {len(images)} image(s) from {args.images}")
    files += per_image_pictures(model, images, out, args)
    print(format_rows(rows))
    _log(f"wrote {len(files)} files in {time.perf_counter() - t0:.1f} s")
    single = len(images) == 1  # a standard deviation over one image is undefined, not a failure
    bad = [f"layer {r['layer']} {k}" for r in rows + (init_rows or []) for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v) and not (single and k.endswith("_std"))]
    return {"rows": rows, "files": files, "nonfinite": bad}


def run_tokens(args) -> dict:
    """`--tokens`: the per-layer measurements of a language-model bundle on token sequences."""
    from crate_jax.analysis.lm_measure import measure_lm
    from crate_jax.checkpoint import models
    from crate_jax.lm.inference import TokenInputError, check_tokens, read_token_array
    from crate_jax.models import registry

    t0 = time.perf_counter()
    if not Path(args.checkpoint).is_dir():
        raise AnalyzeError(f"checkpoint directory {args.checkpoint} does not exist (expected a bundle)")
    try:
        cfg, model = models.load(args.checkpoint, kind=("lm", "bert"))
    except models.KindError as e:
        raise AnalyzeError(f"{e}; --tokens needs a language-model bundle (use --images for image models)") from e
    try:
        encoder = registry.kind_of(cfg) == "bert"  # masked-LM rows: padding excluded (crate_jax.mlm.measure)
        if encoder:
            from crate_jax.mlm.measure import check_rows, measure_bert
            tokens = check_rows(read_token_array(args.tokens), cfg, args.tokens)
        else:
            tokens = check_tokens(read_token_array(args.tokens), cfg, args.tokens, windows=True)
        layers = measure.check_layers(parse_layers(args.layers), cfg.depth)
    except (TokenInputError, ValueError) as e:
        raise AnalyzeError(str(e)) from e
    tokens = tokens[:args.max_images] if args.max_images else tokens
    _log(f"loaded {cfg.model} {cfg.variant} LM (depth {cfg.depth}, {cfg.num_heads} heads); {tokens.shape[0]} "
         f"sequences of {tokens.shape[1]} tokens from {args.tokens}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(batch_size=args.batch_size, paper_eps=args.paper_eps, official_eps_sq=args.official_eps_sq,
              precision=args.precision, layers=layers, progress=_log)
    measure_fn = measure_bert if encoder else measure_lm
    rows = measure_fn(model, tokens, **kw)
    files = [out / "analysis.json", out / "meta.json", out / "rate_reduction.png"]
    _write_json(out / "analysis.json", rows)
    init_rows = None
    if args.compare_init:
        init_rows = measure_fn(registry.build(cfg, args.init_seed), tokens, **kw)
        _write_json(out / "analysis_init.json", init_rows)
        files.append(out / "analysis_init.json")
    from crate_jax.analysis import lm_measure
    _write_json(out / "meta.json", {"checkpoint": str(args.checkpoint), "tokens": str(args.tokens),
                                    "num_sequences": int(tokens.shape[0]), "sequence_length": int(tokens.shape[1]),
                                    "model": cfg.to_dict(), "paper_eps": args.paper_eps,
                                    "official_eps_sq": args.official_eps_sq, "precision": args.precision,
                                    "layers": layers, "definitions": lm_measure.__doc__ + measure.__doc__})
    plots.plot_rate_reduction(rows, out / "rate_reduction.png", init_rows=init_rows, paper_eps=args.paper_eps,
                              official_eps_sq=args.official_eps_sq,
                              title=f"{cfg.model} {cfg.variant} · {tokens.shape[0]} sequence(s) from {args.tokens}")
    print(format_rows(rows))
    _log(f"wrote {len(files)} files in {time.perf_counter() - t0:.1f} s")
    single = tokens.shape[0] == 1
    bad = [f"layer {r['layer']} {k}" for r in rows + (init_rows or []) for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v) and not (single and k.endswith("_std"))]
    return {"rows": rows, "files": files, "nonfinite": bad}


def check_out(args) -> None:
    """`--out`, checked before any model is loaded: a directory (not a file, not under a file) that holds
    none of the inputs and is new, empty or an earlier analysis (meta.json)."""
    from crate_jax.checkpoint.outputs import check_destination, check_output
    inputs = [args.checkpoint, args.tokens] + ([args.images] if args.images and Path(args.images).exists() else [])
    check_output(args.out, inputs, flag="out")
    check_destination(args.out, directory=True, overwrite=True, flag="out", marker="meta.json")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from crate_jax import errors
    from crate_jax.checkpoint.bundle import BundleError
    from crate_jax.checkpoint.outputs import atomic_output_dir
    from crate_jax.models import ConfigError

    try:
        check_out(args)
        # written to a temporary sibling and swapped in whole: a failure or a kill leaves the earlier analysis
        with atomic_output_dir(args.out, overwrite=True) as tmp:
            result = run(argparse.Namespace(**{**vars(args), "out": str(tmp)}))
        _log(f"output: {args.out}")
    except (AnalyzeError, ImageSourceError, BundleError, ConfigError, errors.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["nonfinite"]:
        print(f"error: {len(result['nonfinite'])} measurements are NaN or inf ({', '.join(result['nonfinite'][:6])}"
              f"{', ...' if len(result['nonfinite']) > 6 else ''}): the activations overflow; try --precision "
              f"float64 or a float32 bundle. They are written as null.", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
