"""CLIPA's speed-up from token reduction: train-step throughput at low vs full resolution.

    python bench/clipa_step.py --variant B/16 --text B --batch 256 --res 84,224
    python bench/clipa_step.py --variant Ti/14 --text mu --batch 32 --width 96 --depth 4 --heads 3   # CPU-sized

Both resolutions are measured in one process with the engine's own pieces (`Setup` from
`crate_jax.train.loop`: the real config `configs/clipa.py`, the sharded jitted train step with the
global-batch loss and the CLIPA optimizer, text tower and temperature frozen unless
`--train-text`), on random uint8 images and token ids. For each resolution it prints examples/s,
the analytic train FLOPs per example and MFU against a float32 matmul peak measured in the same
process, then the throughput ratio (CLIPA reports large speed-ups because the image tower's token
count falls with the square of the resolution: 37 vs 257 tokens for L/14 at 84 vs 224 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def measure(args, res: int) -> dict:
    from configs import clipa
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train import metrics as M
    from crate_jax.train.evaluation import global_batch
    from crate_jax.train.setup import Setup

    arg = (f"variant={args.variant},res={res},txt_len={args.txt_len},text={args.text},batch={args.batch},"
           f"freeze_text={not args.train_text},steps=1000,warmup=10,width={args.width},depth={args.depth},"
           f"heads={args.heads},out_dim={args.out_dim},vocab_size={args.vocab_size}")
    config = clipa.get_config(arg)
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1} if args.mesh == "data" else {"data": 1, "fsdp": -1, "tensor": 1}
    if args.dtype:
        config.model.image.dtype = config.model.text.dtype = args.dtype
    if not args.train_text:  # the recipe loads a pretrained text tower; timing needs only its shapes
        config.init.checkpoint = "(not loaded: benchmark)"
    mesh = make_mesh(config.mesh)
    setup = Setup(config, mesh)
    task = setup.task
    t0 = time.perf_counter()
    compiled = setup.compile()
    compile_s = time.perf_counter() - t0
    state = setup.fresh_state(load_init=False)
    rng = np.random.default_rng(0)
    b, spec = setup.per_process_batch, task.batch_spec()
    batch = global_batch({"image": rng.integers(0, 256, (b,) + spec["image"].shape, dtype=np.uint8),
                          "text": rng.integers(1, args.vocab_size, (b,) + spec["text"].shape).astype(np.int32)}, mesh)
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    peak = M.measure_matmul_peak() * jax.device_count()
    eps = setup.global_batch_size / step_s
    flops = task.flops_per_example()
    return {"res": res, "tokens": task.model_cfg.image.num_patches + 1, "step_s": step_s, "examples_per_s": eps,
            "train_gflops_per_example": flops / 1e9, "mfu": eps * flops / peak, "peak_gflops": peak / 1e9,
            "compile_s": compile_s, "loss": float(m["train/loss"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="B/16", help="image variant, e.g. L/14")
    ap.add_argument("--text", default="B", help="text variant (mu, Ti, S, B, L, H)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--txt-len", type=int, default=32)
    ap.add_argument("--res", default="84,224", help="comma-separated resolutions; the first is the baseline")
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--out-dim", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=32_000)
    ap.add_argument("--dtype", default="", help="compute dtype override (float32, bfloat16)")
    ap.add_argument("--mesh", choices=["data", "fsdp"], default="data")
    ap.add_argument("--train-text", action="store_true", help="train the text tower too (default: frozen, as CLIPA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    results = []
    for res in (int(r) for r in args.res.split(",")):
        r = measure(args, res)
        results.append(r)
        print(f"{args.variant} @ {res:>3} px ({r['tokens']:>3} image tokens): {r['examples_per_s']:9.1f} ex/s, "
              f"step {1000 * r['step_s']:8.1f} ms, {r['train_gflops_per_example']:.3f} GFLOP/example, "
              f"MFU {100 * r['mfu']:.1f}% of {r['peak_gflops']:.0f} GFLOP/s (compile {r['compile_s']:.1f}s)",
              flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"speed-up of {base['res']} px over {r['res']} px: {base['examples_per_s'] / r['examples_per_s']:.2f}x "
              f"throughput ({r['train_gflops_per_example'] / base['train_gflops_per_example']:.2f}x fewer FLOPs)")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
