"""Bundles from self-supervised runs: the SimDINO student or teacher (whole, or its backbone alone as a
headless classifier bundle), or a CRATE-MAE.

    python -m crate_jax.ssl.bundles --workdir runs/simdino --output bundles/simdino_teacher --teacher [--backbone]
    python -m crate_jax.ssl.bundles --workdir runs/mae --output bundles/mae

A backbone bundle (`--backbone`, kind 'classifier', `num_classes = 0`) is what `crate_jax.analyze` reads
and what any classifier tool takes; the whole self-distillation bundle (kind 'self_distill') fine-tunes
just as well (`crate_jax.models.backbones`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from crate_jax import errors
from crate_jax.checkpoint import models
from crate_jax.checkpoint.bundle import BundleError
from crate_jax.checkpoint.outputs import check_destination, check_output
from crate_jax.checkpoint.params import ParamsError
from crate_jax.cli import tool_parser


def export_run(workdir, output, *, teacher: bool = False, backbone: bool = False, overwrite: bool = False,
               keep_old: bool = False) -> Path:
    """Writes the newest committed parameters of the run in `workdir` (the EMA teacher's with `teacher`) as a
    bundle; `backbone` keeps only a self-distillation model's backbone (a headless classifier bundle)."""
    check_output(output, workdirs=(workdir,))
    check_destination(output, directory=True, overwrite=overwrite)
    label = f"{Path(str(workdir)).name}:{'teacher' if teacher else 'student'}"
    return models.bundle_from(workdir, output, params="teacher" if teacher else "student", backbone=backbone,
                              overwrite=overwrite, keep_old=keep_old, label=label)[2]


def main(argv=None) -> int:
    ap = tool_parser("crate_jax.ssl.bundles", __doc__)
    ap.add_argument("--workdir", required=True, help="a training workdir (config.json, model.json, checkpoints/)")
    ap.add_argument("--output", required=True, help="bundle directory to create")
    ap.add_argument("--teacher", action="store_true", help="the EMA teacher's parameters (SimDINO runs)")
    ap.add_argument("--backbone", action="store_true", help="only the backbone, as a headless classifier bundle")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output directory (swapped in only once the new bundle is complete)")
    ap.add_argument("--keep-old", action="store_true",
                    help="with --overwrite: keep the replaced bundle beside the new one as NAME.old-STAMP")
    args = ap.parse_args(argv)
    try:
        if args.keep_old and not args.overwrite:
            raise errors.UsageError("--keep-old keeps the bundle that --overwrite replaces; pass both")
        out = export_run(args.workdir, args.output, teacher=args.teacher, backbone=args.backbone,
                         overwrite=args.overwrite, keep_old=args.keep_old)
    except (BundleError, ParamsError, errors.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bundle: {out}")
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
