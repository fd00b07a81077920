"""Bundles from self-supervised runs: the SimDINO student or teacher (whole, or its backbone alone as a
headless classifier bundle), or a CRATE-MAE.

    python -m crate_jax.ssl.bundles --workdir runs/simdino --output bundles/simdino_teacher --teacher [--backbone]
    python -m crate_jax.ssl.bundles --workdir runs/mae --output bundles/mae

A backbone bundle (`--backbone`, kind 'classifier', `num_classes = 0`) is what `crate_jax.analyze` reads
and what any classifier tool takes; the whole self-distillation bundle (kind 'self_distill') fine-tunes
just as well (`crate_jax.models.backbones`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crate_jax.checkpoint.bundle import BundleError, load_config, save_bundle
from crate_jax.checkpoint.params import ParamsError, read_params
from crate_jax.models.self_distill import SelfDistillConfig


def export_run(workdir, output, *, teacher: bool = False, backbone: bool = False, overwrite: bool = False) -> Path:
    """Writes the newest committed parameters of the run in `workdir` (the EMA teacher's with `teacher`) as a
    bundle; `backbone` keeps only a self-distillation model's backbone (a headless classifier bundle)."""
    cfg = load_config(workdir)
    if (teacher or backbone) and not isinstance(cfg, SelfDistillConfig):
        raise BundleError(f"{workdir} is a {type(cfg).__name__} run; --teacher / --backbone need a SimDINO run")
    params = read_params(workdir, subtree="extras")["teacher"] if teacher else read_params(workdir)
    which = "teacher" if teacher else "student"
    if backbone:
        cfg, params = cfg.backbone, params["backbone"]
    return save_bundle(output, cfg, params, source=f"{cfg.kind}:{Path(str(workdir)).name}:{which}",
                       overwrite=overwrite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crate_jax.ssl.bundles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a training workdir (config.json, model.json, checkpoints/)")
    ap.add_argument("--output", required=True, help="bundle directory to create")
    ap.add_argument("--teacher", action="store_true", help="the EMA teacher's parameters (SimDINO runs)")
    ap.add_argument("--backbone", action="store_true", help="only the backbone, as a headless classifier bundle")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.workdir, args.output, teacher=args.teacher, backbone=args.backbone,
                         overwrite=args.overwrite)
    except (BundleError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bundle: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
