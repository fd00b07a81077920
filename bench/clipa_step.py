"""CLIPA's speed-up from token reduction: train-step throughput at low vs full resolution.

    python bench/clipa_step.py --variant B/16 --text B --batch 256 --res 84,224
    python bench/clipa_step.py --variant Ti/14 --text mu --batch 32 --width 96 --depth 4 --heads 3   # CPU-sized

Both resolutions are built and compiled in one process, then timed interleaved, one step each in
turn (A B A B) with the engine's own pieces (`Setup` from
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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def build(args, res: int):
    """The compiled step at `res`, as `(run_one_step, info)`."""
    from crate_jax.configs import clipa
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.parallel.sharding import global_batch
    from crate_jax.train.setup import Setup

    # The task checks its data config at start-up: a shard pattern (never opened: the batch is random) and a
    # real vocab file (a small one is written here).
    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
    arg = (f"variant={args.variant},res={res},txt_len={args.txt_len},text={args.text},batch={args.batch},"
           f"freeze_text={not args.train_text},steps=1000,warmup=10,width={args.width},depth={args.depth},"
           f"heads={args.heads},out_dim={args.out_dim},vocab_size={args.vocab_size},shards=unused.tar,vocab={vocab}")
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
    box = [state]

    def step():
        box[0], m = compiled(box[0], batch)
        jax.block_until_ready(m)
        return m
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return step, {"res": res, "tokens": task.model_cfg.image.num_patches + 1, "batch": setup.global_batch_size,
                  "train_gflops_per_example": task.flops_per_example() / 1e9, "compile_s": compile_s,
                  "xla_gbytes_per_example": float(cost["bytes accessed"]) / 1e9 / setup.global_batch_size}


def measure(args, built: list) -> list[dict]:
    """Times the built steps interleaved (A B A B, `args.steps` rounds of one step each), so a busy host
    slows every resolution alike; MFU against a matmul peak measured right after."""
    from crate_jax.train import metrics as M
    times = [[] for _ in built]
    for _ in range(args.steps):
        for i, (step, _) in enumerate(built):
            t = time.perf_counter()
            m = step()
            times[i].append(time.perf_counter() - t)
    peak = M.measure_matmul_peak() * jax.device_count()
    out = []
    for (step, info), ts in zip(built, times):
        step_s = float(np.median(ts))
        eps = info["batch"] / step_s
        out.append(dict(info, step_s=step_s, examples_per_s=eps, mfu=eps * info["train_gflops_per_example"] * 1e9 / peak,
                        peak_gflops=peak / 1e9, loss=float(step()["train/loss"])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="B/16", help="image variant, e.g. L/14")
    ap.add_argument("--text", default="B", help="text variant (mu, Ti, S, B, L, H)")
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--txt-len", type=int, default=32, help="caption length in tokens")
    ap.add_argument("--res", default="84,224", help="comma-separated resolutions; the first is the baseline")
    ap.add_argument("--width", type=int, default=0, help="image and text width override (0: the variant's)")
    ap.add_argument("--depth", type=int, default=0, help="depth override of both towers (0: the variant's)")
    ap.add_argument("--heads", type=int, default=0, help="attention heads override (0: the variant's)")
    ap.add_argument("--out-dim", type=int, default=0, help="embedding dimension override (0: the recipe's)")
    ap.add_argument("--vocab-size", type=int, default=32_000, help="text vocabulary size")
    ap.add_argument("--dtype", default="", help="compute dtype override (float32, bfloat16)")
    ap.add_argument("--mesh", choices=["data", "fsdp"], default="data",
                    help="shard the batch only (data) or also the state (fsdp)")
    ap.add_argument("--train-text", action="store_true", help="train the text tower too (default: frozen, as CLIPA)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per resolution after compiling")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each resolution per round)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    results = measure(args, [build(args, int(r)) for r in args.res.split(",")])
    for r in results:
        print(f"{args.variant} @ {r['res']:>3} px ({r['tokens']:>3} image tokens): {r['examples_per_s']:9.1f} ex/s, "
              f"step {1000 * r['step_s']:8.1f} ms, {r['train_gflops_per_example']:.3f} GFLOP/example, "
              f"MFU {100 * r['mfu']:.1f}% of {r['peak_gflops']:.0f} GFLOP/s, XLA: {r['xla_gbytes_per_example']:.3f} "
              f"GB accessed/example (compile {r['compile_s']:.1f}s)",
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
