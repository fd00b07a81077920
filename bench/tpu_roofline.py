"""Roofline estimate for a TPU slice from the ahead-of-time compile (libtpu, no TPU needed).

    pip install 'libtpu==0.0.42.*'      # the `aot` extra
    python bench/tpu_roofline.py --config configs/imagenet21k.py:variant=L/14 --topology v5p-128
    python bench/tpu_roofline.py --config configs/clipa.py:variant=L/14,stage=pretrain,shards=unused.tar,vocab=VOCAB.txt,init=unused \
        --topology v5p-128      # the CLIPA task checks these keys; nothing is read (VOCAB.txt: any vocab file)

The real sharded train step is compiled for the slice's chips as `crate_jax.aot` does; the TPU
compiler's cost analysis gives one chip's FLOPs and HBM bytes per step. The roofline bound of the step
is `max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)` per chip, with the chip's published bf16 peak and
bandwidth. It is an estimate: it ignores collectives (all-gathers of FSDP shards, gradient
reduce-scatters), assumes every matmul runs at peak, and XLA's byte count is its own model of HBM
traffic, not a measurement. The achievable step time is above the bound.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Published per-chip figures: dense bf16 FLOP/s and HBM bytes/s.
CHIPS = {"v4": (275e12, 1228e9), "v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1640e9)}


def _unroll(model_cfg) -> list[str]:
    """Sets every `scan` under `config.model` to False: XLA's cost analysis counts a loop body once, and the
    unrolled step computes the same (scan == unrolled). Returns the keys it changed."""
    changed = []
    for key in list(model_cfg.keys()):
        value = model_cfg[key]
        if key == "scan" and value:
            model_cfg[key] = False
            changed.append(key)
        elif hasattr(value, "keys"):
            changed += [f"{key}.{k}" for k in _unroll(value)]
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/imagenet21k.py:variant=L/14")
    ap.add_argument("--topology", default="v5p-128")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from crate_jax import aot
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train import config_cli
    from crate_jax.train.setup import Setup
    target = aot.parse_topology(args.topology)
    config = config_cli.load_with_overrides(args.config, [f"--config.{kv}" for kv in args.set])
    config = aot.offline_config(config)
    unrolled = _unroll(config.model)
    if config.get("microbatches", 1) > 1:
        raise SystemExit("microbatches > 1 loops inside the step, which XLA's cost analysis counts once; "
                         "estimate with --set microbatches=1 and scale")
    if config.get("init") is not None and config.init.get("checkpoint"):
        config.init.checkpoint = "(not loaded: compile only)"
    devices = aot.tpu_devices(target)
    mesh = make_mesh({k: v for k, v in dict(config.mesh).items() if k != "num_devices"}, devices=devices)
    setup = Setup(config, mesh)
    compiled = setup.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, hbm = float(cost["flops"]), float(cost["bytes accessed"])
    peak, bw = CHIPS[target.generation]
    t_compute, t_memory = flops / peak, hbm / bw
    bound = max(t_compute, t_memory)
    analytic = float(setup.task.flops_per_example()) * setup.global_batch_size / len(devices)
    mem = compiled.memory_analysis()
    print(f"{args.config} on {target.name} ({len(devices)} chips, mesh {dict(mesh.shape)}), global batch "
          f"{setup.global_batch_size}: ESTIMATE from the TPU compiler's cost analysis (compile-only, libtpu)"
          + (f"; compiled unrolled ({', '.join('model.' + k for k in unrolled)} = False)" if unrolled else ""))
    print(f"  per chip per step: {flops / 1e12:.2f} TFLOP (analytic 3 x forward: {analytic / 1e12:.2f}), "
          f"{hbm / 1e9:.1f} GB of HBM traffic; arithmetic intensity {flops / hbm:.0f} FLOP/byte "
          f"(ridge point of {target.generation}: {peak / bw:.0f})")
    print(f"  roofline: compute {1e3 * t_compute:.0f} ms at {peak / 1e12:.0f} TFLOP/s, memory {1e3 * t_memory:.0f} ms at "
          f"{bw / 1e9:.0f} GB/s -> step >= {1e3 * bound:.0f} ms ({'compute' if t_compute >= t_memory else 'memory'}"
          f"-bound), >= {setup.global_batch_size / bound:,.0f} examples/s over the slice; MFU at the bound "
          f"{100 * analytic / peak / bound:.0f}% (analytic FLOPs)")
    if mem is not None:
        print(f"  per-chip memory: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{mem.temp_size_in_bytes / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
