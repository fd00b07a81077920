"""What XLA made of a compiled program: FLOPs and bytes from its cost analysis, temporaries from its
memory analysis, and the size of every fused kernel (instructions, inputs) read from the optimised HLO.

    python bench/compiled_stats.py                       # our CRATE-α-B/16 gradient at 224 px, batch 8
    python bench/compiled_stats.py --what fwd --model crate --variant T/16 --batch 16
    python bench/compiled_stats.py --official-alpha /tmp/official/CRATE-alpha   # the official model too
    python bench/compiled_stats.py --port                 # the plain ports of bench/crate_*_port.py

The fusion counts are the profile evidence of `RESULTS.md` ("Profiles"): a program whose backward pass
re-derives the residual-stream gradient inside every layer's kernels shows many fused kernels of
hundreds of instructions; a healthy one has none above 100.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_HEADER = re.compile(r"^%?([\w.\-]+) \(.*\{\s*$")


def fusion_sizes(hlo_text: str) -> dict[str, tuple[int, int]]:
    """`{fused computation: (instructions, parameters)}` of an optimised HLO module's text."""
    sizes, current = {}, None
    for line in hlo_text.splitlines():
        m = None if line.startswith(" ") else _HEADER.match(line)
        if m and "fused" in m.group(1):
            current = m.group(1)
            sizes[current] = [0, 0]
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            sizes[current][0] += 1
            sizes[current][1] += " parameter(" in line
    return {k: (v[0], v[1]) for k, v in sizes.items()}


def summary(compiled, compile_s: float | None = None) -> dict:
    """FLOPs, bytes accessed, temporaries and fusion statistics of a `jax.stages.Compiled`."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    sizes = sorted(fusion_sizes(compiled.as_text()).values(), reverse=True)
    return {"gflops": cost["flops"] / 1e9, "gbytes": cost["bytes accessed"] / 1e9,
            "temp_mib": None if mem is None else mem.temp_size_in_bytes / 2**20,
            "fusions": len(sizes), "fusions_over_100": sum(n > 100 for n, _ in sizes),
            "largest": sizes[:3], "compile_s": compile_s}


def describe(name: str, s: dict) -> str:
    temp = "?" if s["temp_mib"] is None else f"{s['temp_mib']:.0f}"
    compile_s = "" if s["compile_s"] is None else f", compile {s['compile_s']:.1f} s"
    largest = ", ".join(f"{n} instr / {p} inputs" for n, p in s["largest"])
    return (f"{name}: {s['gflops']:.1f} GFLOP, {s['gbytes']:.2f} GB accessed, temps {temp} MiB, "
            f"{s['fusions']} fused kernels, {s['fusions_over_100']} over 100 instructions (largest: {largest})"
            f"{compile_s}")


def compile_stats(fn, *args) -> dict:
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return summary(compiled, time.perf_counter() - t)


def _ours(model: str, variant: str, res: int, batch: int, what: str, scan: bool):
    from flax import nnx
    from crate_jax.models import build_model, model_config
    cfg = model_config(model, variant, image_size=res, num_classes=1000, scan=scan)
    graphdef, params = nnx.split(build_model(cfg, 0))

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))
    return (jax.grad(loss) if what == "grad" else loss), params


def _port(model: str, variant: str, res: int):
    if model == "crate":
        import crate_port as port
        from crate_jax.models.config import CRATE_VARIANTS, parse_variant
        name, patch = parse_variant("crate", variant)
        d, depth, heads, _ = CRATE_VARIANTS[name]
        dims = port.CrateDims(dim=d, depth=depth, heads=heads, patch=patch, image_size=res)
    else:
        import crate_alpha_port as port
        from crate_jax.models.config import CRATE_ALPHA_VARIANTS, parse_variant
        name, patch = parse_variant("crate_alpha", variant)
        d, depth, heads, _ = CRATE_ALPHA_VARIANTS[name]
        dims = port.AlphaDims(dim=d, depth=depth, heads=heads, patch=patch, image_size=res)
    params = jax.eval_shape(lambda: port.init_params(jax.random.key(0), dims))
    return (lambda p, x, y: port.loss_fn(p, x, y, dims)), params


def _official_alpha(repo: str, variant: str, res: int):
    from official import alpha_module
    crate = alpha_module(repo)
    model = crate.Model(num_classes=1000, variant=variant)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))["params"]

    def loss(p, x, y):
        logits, _ = model.apply({"params": p}, x, train=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))
    return loss, params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="crate_alpha", choices=["crate_alpha", "crate", "vit"], help="model family")
    ap.add_argument("--variant", default="B/16", help="size name, e.g. B/16, T/16")
    ap.add_argument("--res", type=int, default=224, help="image resolution in pixels")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--what", default="grad", choices=["grad", "fwd"],
                    help="compile the gradient of the loss or the forward pass only")
    ap.add_argument("--scan", action="store_true", help="our model with scan over layers")
    ap.add_argument("--port", action="store_true", help="also the plain port (bench/crate_port.py, crate_alpha_port.py)")
    ap.add_argument("--official-alpha", metavar="CHECKOUT", help="also the official JAX CRATE-α at this checkout")
    args = ap.parse_args(argv)
    x = jax.ShapeDtypeStruct((args.batch, args.res, args.res, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    grad = (lambda f: jax.grad(f)) if args.what == "grad" else (lambda f: f)
    label = f"{args.model} {args.variant} @ {args.res} px, batch {args.batch}, {args.what}"
    fn, params = _ours(args.model, args.variant, args.res, args.batch, args.what, args.scan)
    print(describe(f"ours{' (scan)' if args.scan else ''} {label}", compile_stats(fn, params, x, y)), flush=True)
    if args.port and args.model != "vit":
        fn, params = _port(args.model, args.variant, args.res)
        print(describe(f"plain port {label}", compile_stats(grad(fn), params, x, y)), flush=True)
    if args.official_alpha and args.model == "crate_alpha":
        fn, params = _official_alpha(args.official_alpha, args.variant, args.res)
        print(describe(f"official {label}", compile_stats(grad(fn), params, x, y)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
