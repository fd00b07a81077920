"""Model zoo facts: parameter counts and forward FLOPs per image.

    python -m crate_jax.info --model crate_alpha --variant B/16 --image-size 224 --num-classes 1000 [--json]
    python -m crate_jax.info --table

FLOPs are reported twice: from XLA's cost analysis of the lowered forward pass, and from the
analytic count in `crate_jax.models.flops` (matmuls + attention, a multiply-add counts 2).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax import errors
from crate_jax.cli import tool_parser
from crate_jax.models import VARIANTS, ConfigError, abstract_model, count_params, model_config
from crate_jax.models.flops import forward_flops

# The paper's config table: the sizes each family is published at.
ZOO = [("crate", v) for v in ("T/16", "S/16", "B/16", "L/16")] + \
      [("crate_alpha", v) for v in ("Ti/16", "S/16", "S/32", "B/32", "B/16", "B/8", "L/32", "L/14", "L/8",
                                    "H/14", "g/14")] + \
      [("vit", v) for v in ("Ti/16", "S/16", "B/16", "L/16", "H/14")]


def xla_forward_flops(cfg) -> float:
    """FLOPs of one image's forward pass from XLA's cost analysis (lowered, not compiled)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cost = fwd.lower(state, jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels),
                                                 jnp.float32)).cost_analysis()
    return float(cost["flops"]) if cost and "flops" in cost else float("nan")


def describe(model: str, variant: str, image_size: int = 224, num_classes: int = 1000, xla: bool = True) -> dict:
    cfg = model_config(model, variant, image_size=image_size, num_classes=num_classes)
    row = dict(model=model, variant=cfg.variant, image_size=image_size, num_classes=num_classes, width=cfg.width,
               depth=cfg.depth, heads=cfg.num_heads, head_dim=cfg.head_dim, dict_size=cfg.dict_size,
               tokens=cfg.num_patches + 1, params=count_params(abstract_model(cfg)),
               gflops_analytic=forward_flops(cfg) / 1e9)
    if xla:
        row["gflops_xla"] = xla_forward_flops(cfg) / 1e9
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'variant':<7} {'width':>5} {'depth':>5} {'heads':>5} {'p':>4} {'dict':>5} " \
           f"{'tokens':>6} {'params':>13} {'GFLOPs (XLA)':>12} {'GFLOPs (analytic)':>17}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['variant']:<7} {r['width']:>5} {r['depth']:>5} {r['heads']:>5} "
                     f"{r['head_dim']:>4} {r['dict_size']:>5} {r['tokens']:>6} {r['params']:>13,} "
                     f"{r.get('gflops_xla', float('nan')):>12.2f} {r['gflops_analytic']:>17.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = tool_parser("crate_jax.info", __doc__)
    ap.add_argument("--model", choices=sorted(VARIANTS), default="crate_alpha", help="model family")
    ap.add_argument("--variant", default="B/16", help="size name, e.g. B/16, L/14")
    ap.add_argument("--image-size", type=int, default=224, help="input resolution in pixels")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--table", action="store_true", help="the whole zoo, as the paper's config table")
    ap.add_argument("--no-xla", action="store_true", help="skip XLA cost analysis (analytic FLOPs only)")
    args = ap.parse_args(argv)
    try:
        if args.table:
            rows = [describe(m, v, args.image_size, args.num_classes, xla=not args.no_xla) for m, v in ZOO]
        else:
            rows = [describe(args.model, args.variant, args.image_size, args.num_classes, xla=not args.no_xla)]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows if args.table else rows[0], indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
