"""Emergent segmentation, measured: MaskCut predictions in COCO format, class-agnostic COCO AP, and the
mIoU of thresholded [CLS] attention.

    python -m crate_jax.segment maskcut --checkpoint BUNDLE --images DIR|FILE.npy --out preds.json
        [--annotations instances.json] [--layer -1] [--tau 0.15] [--n-masks 3] [--crf] [--size PX]
    python -m crate_jax.segment score --annotations instances.json --predictions preds.json
        [--iou-type segm|bbox|both] --out metrics.json
    python -m crate_jax.segment attention --checkpoint BUNDLE --images DIR|FILE.npy --masks DIR|FILE.npy
        --out metrics.json [--layer -2] [--mass 0.6] [--size PX]

`maskcut` runs CutLER's MaskCut (`crate_jax.analysis.cutler`) on the patch features of one layer (CRATE /
CRATE-α: the shared qkv projection; ViT: the keys) and writes COCO results: one record per mask with an RLE
`segmentation` at the image's own size, its `bbox`, `score` 1.0 (MaskCut does not rank its masks; COCO then
keeps the file's order, which is the order the masks were found) and `category_id` 1. Image ids come from
`--annotations` (matched by `file_name`) or from numeric file names. `--crf` refines masks with CutLER's
DenseCRF when `pydensecrf2` is installed (`pip install 'crate_jax[crf]'`); otherwise it says "no CRF".

`score` evaluates predictions class-agnostically (every category mapped to one, crowd regions kept) with
`pycocotools.COCOeval` and writes `{"segm": {...}, "bbox": {...}}` with AP, AP50, AP75, APs, APm, APl, AR1,
AR10, AR100, ARs, ARm, ARl (`crate_jax.analysis.coco_eval`).

`attention` scores coarse segmentation (`crate_jax.analysis.attention_miou`): per head the patches holding
`--mass` of the [CLS] attention of `--layer` (default the penultimate), upsampled, against VOC-layout masks
(`--masks DIR` holding NAME.png for each image NAME, class ids per pixel, 255 ignored; or an `.npy` [M, H, W]).

Outputs are written atomically and never over an input; an existing output needs `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from crate_jax import errors
from crate_jax.analysis import cutler as mc
from crate_jax.cli import tool_parser

CHUNK = 64  # images resized and featurised at a time


def _log(msg: str) -> None:
    print(f"[segment] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("crate_jax.segment", __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q, layer: int, layer_help: str):
        q.add_argument("--checkpoint", required=True, help="bundle: classifier, CLIP two-tower or SimDINO")
        q.add_argument("--images", required=True, help="folder of images or .npy [M, H, W, 3]")
        q.add_argument("--layer", type=int, default=layer, help=layer_help)
        q.add_argument("--size", type=int, default=None,
                       help="model input size in px (default the bundle's; others resample the position embedding)")
        q.add_argument("--max-images", type=int, default=None, help="use at most this many images")
        q.add_argument("--batch-size", type=int, default=16, help="images per forward pass")

    q = sub.add_parser("maskcut", help="MaskCut masks as COCO results JSON")
    model_args(q, -1, "layer of the features (default the last; the papers use 11 of 12)")
    q.add_argument("--annotations", default=None, help="COCO instances.json giving the image ids (optional)")
    q.add_argument("--tau", type=float, default=mc.TAU, help="cosine threshold of the affinity graph")
    q.add_argument("--n-masks", type=int, default=mc.N_MASKS, help="cuts per image")
    q.add_argument("--crf", action="store_true", help="refine with DenseCRF (needs pydensecrf2)")
    q.add_argument("--solver", choices=mc.SOLVERS, default="auto",
                   help="eigensolver: CutLER's scipy eigh (exact, slow above 40x40 patches), lanczos, or jax (on "
                        "the accelerator); auto: eigh up to 1600 patches, lanczos above")

    q = sub.add_parser("score", help="class-agnostic COCO AP / AR through pycocotools")
    q.add_argument("--annotations", required=True, help="COCO instances.json")
    q.add_argument("--predictions", required=True, help="COCO results JSON")
    q.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both", help="score masks (segm), boxes (bbox) or both")

    q = sub.add_parser("attention", help="mIoU of thresholded [CLS] attention against VOC-style masks")
    model_args(q, -2, "layer of the attention (default the penultimate)")
    q.add_argument("--masks", required=True, help="folder of NAME.png class masks, or .npy [M, H, W]")
    q.add_argument("--mass", type=float, default=0.6, help="attention mass each head keeps")
    for q in sub.choices.values():
        q.add_argument("--out", required=True, help="output JSON file")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _write_json(path, obj, overwrite: bool) -> None:
    from crate_jax.checkpoint.outputs import atomic_output_file

    with atomic_output_file(path, "w", overwrite=overwrite) as f:
        json.dump(_finite_or_none(obj), f)
        f.write("\n")


def _check_out(args, inputs) -> None:
    from crate_jax.checkpoint.outputs import check_destination, check_output

    check_output(args.out, inputs=inputs, flag="out")
    check_destination(args.out, directory=False, overwrite=args.overwrite, flag="out")


def _check_model_args(args) -> None:
    if args.batch_size < 1:
        raise errors.UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise errors.UsageError(f"--max-images must be >= 1, got {args.max_images}")
    if args.size is not None and args.size < 1:
        raise errors.UsageError(f"--size must be a positive number of pixels, got {args.size}")


def _backbone(args):
    from crate_jax.analysis import measure, seg_inputs

    cfg, model = seg_inputs.load_backbone(args.checkpoint)
    cfg, model = seg_inputs.at_size(cfg, model, args.size)
    try:
        layer = measure.check_layers([args.layer], cfg.depth)[0]
    except ValueError as e:
        raise errors.UsageError(f"--layer: {e}") from None
    _log(f"{cfg.model} {cfg.variant} at {cfg.image_size} px ({cfg.grid}x{cfg.grid} patches), layer {layer}")
    return cfg, model, layer


def run_maskcut(args) -> dict:
    from crate_jax.analysis import coco_eval, densecrf, seg_inputs

    _check_model_args(args)
    if args.n_masks < 1:
        raise errors.UsageError(f"--n-masks must be >= 1, got {args.n_masks}")
    if not -1.0 <= args.tau < 1.0:
        raise errors.UsageError(f"--tau is a cosine similarity in [-1, 1), got {args.tau}")
    _check_out(args, (args.checkpoint, args.images, args.annotations))
    crf = bool(args.crf and densecrf.available())
    if args.crf and not crf:
        _log(f"no CRF: pydensecrf2 is not installed ({densecrf.INSTALL_HINT}); masks are the raw cuts")
    t0 = time.perf_counter()
    cfg, model, layer = _backbone(args)
    entries = seg_inputs.image_entries(args.images, args.annotations, args.max_images)
    records = []
    for start in range(0, len(entries), CHUNK):  # a chunk at a time: COCO val2017 does not fit in memory whole
        chunk = [(image_id, load()) for image_id, _, load in entries[start:start + CHUNK]]
        display, normalized = seg_inputs.model_inputs([im for _, im in chunk], cfg.image_size)
        _, feats = seg_inputs.features_and_attention(model, normalized, layer, args.batch_size)
        for i, (image_id, image) in enumerate(chunk):
            masks = seg_inputs.maskcut_image(feats[i], cfg.grid, cfg.patch_size, image.shape[:2], display=display[i],
                                             crf=crf, n_masks=args.n_masks, tau=args.tau, solver=args.solver)
            records += coco_eval.result_records(image_id, masks)
        _log(f"{start + len(chunk)}/{len(entries)} images, {len(records)} masks "
             f"({time.perf_counter() - t0:.0f} s)")
    _write_json(args.out, records, args.overwrite)
    summary = {"images": len(entries), "masks": len(records), "crf": crf, "layer": layer,
               "seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {len(records)} masks for {len(entries)} images to {args.out} "
          f"({'CRF' if crf else 'no CRF'}, layer {layer}, tau {args.tau:g})")
    return summary


def format_metrics(metrics: dict) -> str:
    from crate_jax.analysis.coco_eval import STAT_NAMES

    lines = [f"{'':6}" + "".join(f"{k:>7}" for k in STAT_NAMES)]
    for t, row in metrics.items():
        lines.append(f"{t:6}" + "".join(f"{100 * row[k]:7.1f}" if row[k] >= 0 else f"{'-':>7}" for k in STAT_NAMES))
    return "\n".join(lines)


def run_score(args) -> dict:
    from crate_jax.analysis import coco_eval

    _check_out(args, (args.annotations, args.predictions))
    types = coco_eval.IOU_TYPES if args.iou_type == "both" else (args.iou_type,)
    metrics = coco_eval.score(args.annotations, args.predictions, types)
    _write_json(args.out, metrics, args.overwrite)
    print(format_metrics(metrics))
    return metrics


def _attention_images(source, max_images):
    """`[(name, uint8 image)]`: a folder's images by file stem, or an array's as `<stem>_<i>`."""
    from crate_jax.analysis import samples

    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in samples.IMAGE_SUFFIXES)
        if not files:
            raise errors.UsageError(f"--images {src} holds no images")
        files = files[:max_images] if max_images else files
        from crate_jax.analysis.seg_inputs import open_rgb
        return [(p.stem, open_rgb(p)) for p in files]
    from crate_jax.analysis.seg_inputs import read_images
    return [(name, im) for _, name, im in read_images(source, None, max_images)]


def run_attention(args) -> dict:
    from crate_jax.analysis import attention_miou as am
    from crate_jax.analysis import seg_inputs

    _check_model_args(args)
    if not 0.0 < args.mass <= 1.0:
        raise errors.UsageError(f"--mass must be in (0, 1], got {args.mass}")
    _check_out(args, (args.checkpoint, args.images, args.masks))
    cfg, model, layer = _backbone(args)
    items = _attention_images(args.images, args.max_images)
    targets = am.read_masks(args.masks, [n for n, _ in items], [im.shape[:2] for _, im in items])
    _, normalized = seg_inputs.model_inputs([im for _, im in items], cfg.image_size)
    attn, _ = seg_inputs.features_and_attention(model, normalized, layer, args.batch_size)
    metrics = dict(am.score_attention(attn, targets, cfg.grid, cfg.patch_size, args.mass), layer=layer, mass=args.mass)
    _write_json(args.out, metrics, args.overwrite)
    print(f"attention layer {layer}, mass {args.mass:g}, {metrics['num_images']} images: fg/bg mIoU "
          f"{100 * metrics['miou']:.1f} (fg {100 * metrics['fg_iou']:.1f}), jaccard {100 * metrics['jaccard']:.1f}, "
          f"best head fg {100 * metrics['best_head_fg_iou']:.1f}"
          + (f", class mIoU {100 * metrics['class_miou']:.1f}" if "class_miou" in metrics else ""))
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    {"maskcut": run_maskcut, "score": run_score, "attention": run_attention}[args.command](args)
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
