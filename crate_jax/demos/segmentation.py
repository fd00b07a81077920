"""Emergent segmentation, measured, in miniature: the CLIPA demo's CRATE-α image tower against a ViT tower of
the same size trained by the same recipe, scored by MaskCut COCO AP and by thresholded-attention mIoU on
held-out synthetic scenes with several objects, over several seeds.

    python -m crate_jax.demos.segmentation --workdir runs/seg_demo [--seeds 0,1,2]

1. The CLIPA demo's data (`crate_jax.data.image_text.synth_scenes`: one shape per 64 px image with a caption) and its
   two stages (`crate_jax.demos.clipa.stage_args`: pre-training at 32 px, fine-tuning at 64 px, 8 px patches,
   width 64, depth 2), once with `model=crate_alpha` and once with `model=vit`, per seed (`config.seed`:
   initialisation and data order; the data itself is the same for all runs).
2. Held-out segmentation scenes in COCO format (`crate_jax.data.images.coco_scenes`: 2-4 shapes per 64 px image,
   none of them seen in training), scored at the end of fine-tuning by the `segmentation` evaluator:
   class-agnostic mask / box AP of MaskCut on the last layer's qkv (CRATE-α) or keys (ViT) features, and the
   fg/bg mIoU of the penultimate layer's [CLS] attention kept to 60 % of its mass.
3. A table per run and the mean ± std per model, also written to WORKDIR/seg_demo.json and seg_demo.md.

Re-running on the same workdir reuses the data and the finished runs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

COLUMNS = (("zero-shot top-1", "eval/synth/top1"), ("mask AP50", "eval/seg/mask_AP50"),
           ("mask AP", "eval/seg/mask_AP"), ("box AP50", "eval/seg/box_AP50"), ("box AP", "eval/seg/box_AP"),
           ("attn mIoU", "eval/seg/attn_miou"), ("attn Jaccard", "eval/seg/attn_jaccard"))
MODELS = ("crate_alpha", "vit")


def _clipa():
    from crate_jax.configs import clipa  # the recipes are installed as crate_jax.configs (pyproject package-dir)
    return clipa


def train_stage(arg: str, workdir: Path, seed: int, evals: dict | None = None) -> dict:
    from crate_jax.demos.clipa import final_eval
    from crate_jax.train.loop import train_and_evaluate

    config = _clipa().get_config(arg)
    config.seed = seed
    config.checkpoint_every = config.total_steps
    config.keep_checkpoints = 1
    config.data.num_threads = 2
    for name, spec in (evals or {}).items():
        config.evals[name] = spec
    t0 = time.perf_counter()
    train_and_evaluate(config, workdir)
    print(f"== {workdir} finished in {time.perf_counter() - t0:.0f}s", flush=True)
    return final_eval(workdir)


def make_data(root: Path, train_samples: int, eval_images: int) -> tuple[Path, Path]:
    from crate_jax.data.image_text import synth_scenes
    from crate_jax.data.images import coco_scenes

    data, scenes = root / "data", root / "seg_scenes"
    if not (data / "vocab.txt").exists():
        synth_scenes.generate(data, train_samples=train_samples, eval_samples=1_000, samples_per_shard=1_000,
                              image_size=64, seed=0, workers=2)
        from crate_jax.text.tokenizer import build_vocab_file
        build_vocab_file(data / "captions.txt", data / "vocab.txt", synth_scenes.VOCAB_SIZE)
    if not (scenes / "instances.json").exists():
        coco_scenes.write(scenes, num_images=eval_images, image_size=64, seed=1_000)
    return data, scenes


def run_one(root: Path, data: Path, scenes: Path, model: str, seed: int, args) -> dict:
    from crate_jax.demos.clipa import stage_args

    run = root / f"{model}_seed{seed}"
    pre = stage_args(data, stage="pretrain", steps=args.pretrain_steps, batch=args.batch, lr=3e-3,
                     warmup=args.pretrain_steps // 10, res=32) + f",model={model}"
    train_stage(pre, run / "pretrain", seed)
    ft = stage_args(data, stage="finetune", steps=args.finetune_steps, batch=args.batch, lr=2e-3,
                    warmup=args.finetune_steps // 10, res=64, init=str(run / "pretrain")) + f",model={model}"
    seg = dict(type="segmentation", annotations=str(scenes / "instances.json"), masks=str(scenes / "masks"),
               every=0)
    row = train_stage(ft, run / "finetune", seed, {"seg": seg})
    return {"model": model, "seed": seed, **{key: row.get(key) for _, key in COLUMNS}}


def summarize(rows: list[dict]) -> str:
    """A markdown table: one line per run, then mean ± std per model (percentages)."""
    head = "| model | seed | " + " | ".join(n for n, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['seed']} | " + " | ".join(pct(r[k]) for _, k in COLUMNS) + " |")
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for _, k in COLUMNS:
            vals = [r[k] for r in rows if r["model"] == model and r[k] is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}" if vals else "-")
        lines.append(f"| **{model}** | mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.demos.segmentation", __doc__)
    ap.add_argument("--workdir", required=True, help="where runs, scenes and the table go")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated image towers")
    ap.add_argument("--train-samples", type=int, default=3_000, help="synthetic captioned training images")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps at 32 px")
    ap.add_argument("--finetune-steps", type=int, default=100, help="steps at 64 px")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--eval-images", type=int, default=60, help="held-out multi-object scenes")
    args = ap.parse_args(argv)
    from crate_jax import errors
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise errors.UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    models = [m for m in args.models.split(",") if m]
    if not seeds or any(m not in ("crate_alpha", "crate", "vit") for m in models):
        raise errors.UsageError("--seeds needs at least one seed and --models names from crate_alpha, crate, vit")
    root = Path(args.workdir).absolute()
    t0 = time.perf_counter()
    data, scenes = make_data(root, args.train_samples, args.eval_images)
    rows = [run_one(root, data, scenes, m, s, args) for m in models for s in seeds]
    table = summarize(rows)
    (root / "seg_demo.json").write_text(json.dumps(rows, indent=1) + "\n")
    (root / "seg_demo.md").write_text(table + "\n")
    print(f"\n== emergent segmentation on {args.eval_images} held-out multi-object scenes (64 px, 8x8 patches); "
          f"MaskCut on the last layer, [CLS] attention of the penultimate, {time.perf_counter() - t0:.0f}s\n")
    print(table)
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
