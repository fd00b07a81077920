"""How close CRATE-α's ODL block alone comes to its HBM-traffic floor on a TPU chip (libtpu, compile-only).

    python bench/odl_bytes.py                                  # L width (1024), 16 images x 257 tokens, v6e
    python bench/odl_bytes.py --width 768 --tokens 3152 --topology v5p-8

Compiles the gradient of one `crate_jax.models.layers.ODL` (bfloat16 compute over float32 dictionaries, its
two ISTA steps, ratio 4) with respect to its input and both dictionaries for one chip, and prints the bytes
`crate_jax.parallel.hlo_cost` counts against a floor: every elementwise step fused into the matmul beside
it, so that only the matmuls' operands and results reach HBM (per token, 5·d + 5·m activations forward,
about twice that backward, in bfloat16), plus reading the dictionaries and writing their gradients once.
bench/RESULTS.md ("v6e-256") quotes it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


def floor_bytes(tokens: int, width: int, ratio: int = 4, steps: int = 2) -> float:
    """Activations per token, forward: the first step reads x and writes its code (d + m), each further step
    reads the code and x and writes the residual (m + 2·d), then reads the residual and the code and writes the
    next code (d + 2·m), the decoder reads the code and writes the output (m + d): 5·d + 5·m for two steps;
    backward about twice that; 2 bytes each. Dictionaries: two float32 [d, m] read, their gradients written."""
    m = ratio * width
    forward = (width + m) + (steps - 1) * (3 * width + 3 * m) + (m + width)
    return 3 * forward * tokens * 2 + 2 * 2 * width * m * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16 * 257, help="tokens a chip holds (images x tokens)")
    ap.add_argument("--topology", default="v6e-8", help="a slice of the generation to compile for (one chip used)")
    args = ap.parse_args(argv)

    from crate_jax.aot import tpu_devices
    from crate_jax.models.layers import ODL
    from crate_jax.parallel import hlo_cost
    from crate_jax.parallel.tpu_slices import parse

    odl = ODL(args.width, ratio=4, steps=2, decoupled=True, eta=0.1, lmbda=0.1, dtype=jnp.bfloat16,
              param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graph, params = nnx.split(odl)

    def loss(x, params, g):
        y = nnx.merge(graph, params)(x)
        return jnp.vdot(y, g)  # g: the output's gradient, bfloat16 like the output

    device = tpu_devices(parse(args.topology))[0]
    one = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    x, g = spec((args.tokens, args.width), jnp.bfloat16), spec((args.tokens, args.width), jnp.bfloat16)
    p = jax.tree.map(lambda a: spec(a.shape, a.dtype), params)
    start = time.time()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, p, g).compile()
    b = hlo_cost.Breakdown.of(compiled)
    floor = floor_bytes(args.tokens, args.width)
    per = args.tokens * args.width
    print(f"ODL width {args.width}, {args.tokens} tokens, one {args.topology} chip (compiled in "
          f"{time.time() - start:.0f} s): {b.bytes / 1e9:.3f} GB, {b.bytes / per:.0f} bytes per token per unit "
          f"width; floor {floor / 1e9:.3f} GB ({floor / per:.0f}); {b.bytes / floor:.2f}x the floor; "
          f"{b.flops / 1e12:.3f} TFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
