"""Train-step throughput: examples/s, MFU against a float32 matmul peak measured in this process,
per-device compiled memory, and the CRATE-α : ViT step-time ratio at the same width.

    python bench/train_step.py                                   # CRATE-α vs ViT, Ti/16 at 224 px, batch 32
    python bench/train_step.py --variant B/16 --res 224 --batch 64 --dtype bfloat16   # e.g. on a GPU

It times the real sharded train step (`crate_jax.train.setup.Setup`) on random data; nothing is
downloaded. Timings on a shared CPU are noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.setup import Setup, memory_report
from crate_jax.train.metrics import measure_matmul_peak


def config(model: str, variant: str, res: int, batch: int, dtype: str, remat: str):
    from crate_jax.configs.common import base_config
    from ml_collections import ConfigDict
    from crate_jax.data.images import loader
    c = base_config()
    c.data = loader.default_data_config()  # never opened: num_classes and total_steps are set
    c.res = res
    c.model = ConfigDict(dict(name=model, variant=variant, dtype=dtype, remat=remat, num_classes=1000))
    c.batch_size = batch
    c.total_steps = 1000
    c.optim.update(lr=1e-3, warmup_steps=10, b2=0.95, wd=0.1, clip=1.0)
    return c


def time_step(model: str, variant: str, res: int, batch: int, dtype: str, remat: str, steps: int):
    # num_classes and total_steps are set, so the task never opens a dataset.
    setup = Setup(config(model, variant, res, batch, dtype, remat), make_mesh({"data": -1}))
    t = time.perf_counter()
    compiled = setup.compile()
    compile_s = time.perf_counter() - t
    state = setup.fresh_state()
    rng = np.random.default_rng(0)
    batch_np = {"image": rng.integers(0, 255, (batch, res, res, 3), dtype=np.uint8),
                "label": rng.integers(0, 1000, (batch,), dtype=np.int32)}
    batch_dev = {k: jax.device_put(v, setup.batch_sh[k]) for k, v in batch_np.items()}
    state, m = compiled(state, batch_dev)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch_dev)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return dict(step_s=float(np.median(times)), compile_s=compile_s, memory=memory_report(compiled),
                flops_per_example=setup.task.flops_per_example())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="Ti/16", help="size name, e.g. Ti/16, B/16")
    ap.add_argument("--res", type=int, default=224, help="image resolution in pixels")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ap.add_argument("--remat", default="none", help="config.model.remat (none: no rematerialisation)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model")
    ap.add_argument("--models", default="crate_alpha,vit", help="comma-separated families (crate_alpha, crate, vit)")
    args = ap.parse_args(argv)
    peak = measure_matmul_peak(2048 if jax.default_backend() == "cpu" else 8192) * jax.device_count()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {jax.device_count()} devices; "
          f"float32 matmul peak measured now: {peak / 1e9:.1f} GFLOP/s")
    results = {}
    for model in args.models.split(","):
        r = time_step(model, args.variant, args.res, args.batch, args.dtype, args.remat, args.steps)
        eps = args.batch / r["step_s"]
        mfu = eps * r["flops_per_example"] / peak
        results[model] = r
        print(f"{model:<12} {args.variant} @ {args.res}px batch {args.batch} {args.dtype}: step {r['step_s']*1e3:.1f} ms, "
              f"{eps:,.1f} examples/s, MFU {100 * mfu:.1f}% (compile {r['compile_s']:.1f}s); {r['memory']}")
    if "crate_alpha" in results and "vit" in results:
        ratio = results["crate_alpha"]["step_s"] / results["vit"]["step_s"]
        print(f"CRATE-α / ViT step-time ratio at {args.variant}: {ratio:.2f} "
              f"(analytic FLOP ratio {results['crate_alpha']['flops_per_example'] / results['vit']['flops_per_example']:.2f})")


if __name__ == "__main__":
    main()
