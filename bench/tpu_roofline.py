"""Roofline estimate for a TPU slice from the ahead-of-time compile (libtpu, no TPU needed).

    pip install 'libtpu==0.0.42.*'      # the `aot` extra
    python bench/tpu_roofline.py --config configs/imagenet21k.py:variant=L/14 --topology v5p-128
    python bench/tpu_roofline.py --config configs/clipa.py:variant=L/14,stage=pretrain,shards=unused.tar,vocab=VOCAB.txt,init=unused \\
        --topology v5p-128      # the CLIPA task checks these keys; nothing is read (VOCAB.txt: any vocab file)

The real sharded train step is compiled for the slice's chips as `crate_jax.aot` does; the TPU
compiler's cost analysis gives one chip's FLOPs and HBM bytes per step. The roofline bound of the step
is `max(FLOPs / peak FLOP/s, bytes / HBM bandwidth, interconnect bytes / ICI bandwidth)` per chip, with
the chip's published bf16 peak, HBM and ICI bandwidths (`crate_jax.parallel.hlo_cost.CHIPS`), assuming the
three overlap; it names the term that binds. The interconnect bytes are those of the step's collectives
(ring algorithms, `hlo_cost.Charge.wire_bytes`), read from the compiled program. It is an estimate:
every matmul at peak, every link busy, and XLA's byte count is its own model of HBM traffic, not a
measurement. The achievable step time is above the bound. `--breakdown` prints the top ops by bytes and
FLOPs with their source lines, and the collectives.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



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
    from crate_jax.train import config_cli
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_cli.add_config_arguments(ap, required=False, default="configs/imagenet21k.py:variant=L/14",
                                    help="the config to compile, FILE.py[:ARGS] (default %(default)s)")
    ap.add_argument("--topology", default="v5p-128", help="TPU slice to compile for (default %(default)s)")
    ap.add_argument("--breakdown", action="store_true", help="print the top ops by bytes / FLOPs and the collectives")
    args, overrides = config_cli.parse_args(ap, list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from crate_jax import aot
    from crate_jax.parallel import hlo_cost
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.setup import Setup
    target = aot.parse_topology(args.topology)
    config = config_cli.config_from_args(args, overrides)
    config = aot.offline_config(config)
    unrolled = _unroll(config.model)
    if config.get("microbatches", 1) > 1:
        raise SystemExit("microbatches > 1 loops inside the step, which XLA's cost analysis counts once; "
                         "estimate with --config.microbatches=1 and scale")
    if config.get("init") is not None and config.init.get("checkpoint"):
        config.init.checkpoint = "(not loaded: compile only)"
    devices = aot.tpu_devices(target)
    mesh = make_mesh({k: v for k, v in dict(config.mesh).items() if k != "num_devices"}, devices=devices)
    setup = Setup(config, mesh)
    compiled = setup.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, hbm = float(cost["flops"]), float(cost["bytes accessed"])
    peak, bw, ici = hlo_cost.CHIPS[target.generation]
    wire = hlo_cost.Breakdown.of(compiled).wire_bytes
    roof = hlo_cost.Roofline(flops, hbm, wire, target.generation)
    t_compute, t_memory, t_comm = (roof.times[k] for k in ("compute", "memory", "communication"))
    bound = roof.bound_s
    analytic = float(setup.task.flops_per_example()) * setup.global_batch_size / len(devices)
    mem = compiled.memory_analysis()
    print(f"{args.config} on {target.name} ({len(devices)} chips, mesh {dict(mesh.shape)}), global batch "
          f"{setup.global_batch_size}: ESTIMATE from the TPU compiler's cost analysis (compile-only, libtpu)"
          + (f"; compiled unrolled ({', '.join('model.' + k for k in unrolled)} = False)" if unrolled else ""))
    print(f"  per chip per step: {flops / 1e12:.2f} TFLOP (analytic 3 x forward: {analytic / 1e12:.2f}), "
          f"{hbm / 1e9:.1f} GB of HBM traffic; arithmetic intensity {flops / hbm:.0f} FLOP/byte "
          f"(ridge point of {target.generation}: {peak / bw:.0f})")
    print(f"  roofline: compute {1e3 * t_compute:.0f} ms at {peak / 1e12:.0f} TFLOP/s, memory {1e3 * t_memory:.0f} ms at "
          f"{bw / 1e9:.0f} GB/s, communication {1e3 * t_comm:.0f} ms ({wire / 1e9:.2f} GB per chip at {ici / 1e9:.0f} "
          f"GB/s ICI) -> step >= {1e3 * bound:.0f} ms ({roof.binding}-bound, the three assumed to overlap), "
          f">= {setup.global_batch_size / bound:,.0f} examples/s over the slice; MFU at the bound "
          f"{100 * analytic / peak / bound:.0f}% (analytic FLOPs)")
    if mem is not None:
        print(f"  per-chip memory: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{mem.temp_size_in_bytes / 2**30:.2f} GiB")
    if args.breakdown:
        print(aot.breakdown_text(compiled, target.generation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
