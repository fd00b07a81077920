"""GPU train-step MFU, one script: CRATE-α-B/16 @ 224 px and CRATE-α-L/14 @ 84 px in bf16 with remat off
and on, the fused (cuDNN) attention path against the explicit one, and ViT-B/16.

    python bench/gpu_step.py --out DIR                 # every case (about 6-8 minutes on one H200)
    python bench/gpu_step.py --cases alpha_b16_fused,vit_b16 --steps 5

Each case is our train step (`crate_jax.train.step.make_train_step`: loss → gradients → the CRATE-α
optimizer chain of `crate_jax.train.optim` → metrics), on one device, random data, bf16 compute over
float32 parameters. It is built without `Setup`, so that only jax, flax, optax and ml_collections
are needed (the device image has no data-pipeline packages). MFU = analytic train FLOPs (3 × forward,
`crate_jax.models.flops`) × examples/s, against (a) the H200's dense bf16 peak, 989 TFLOP/s, and
(b) an 8192³ bf16 matmul measured in this process. Results go to stdout and, with `--out`, to
`DIR/gpu_step.jsonl`. On a bare device image (JAX with CUDA, flax, optax; see bench/RESULTS.md, "GPU"), nothing
is installed: `bench/gpu_prepare.sh` copies the one missing pure-Python package (ml_collections) into
build/gpu_site here, and the device run carries it:

    bench/gpu_prepare.sh                                          # here
    PYTHONPATH=.:build/gpu_site python bench/gpu_step.py --out "$OUT"   # on the device (carry: build/gpu_site)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

H200_BF16_PEAK = 989e12  # dense, SXM

# name -> (model, variant, image size, batch, remat, attention)
CASES = {
    "alpha_b16_fused": ("crate_alpha", "B/16", 224, 256, "none", "fused"),
    "alpha_b16_explicit": ("crate_alpha", "B/16", 224, 256, "none", "explicit"),
    "alpha_b16_remat": ("crate_alpha", "B/16", 224, 256, "full", "fused"),
    "alpha_l14_84": ("crate_alpha", "L/14", 84, 1024, "none", "fused"),
    "alpha_l14_84_remat": ("crate_alpha", "L/14", 84, 1024, "full", "fused"),
    "alpha_l14_84_explicit": ("crate_alpha", "L/14", 84, 1024, "none", "explicit"),
    "vit_b16": ("vit", "B/16", 224, 256, "none", "fused"),
}
SMOKE = {"smoke": ("crate_alpha", "Ti/16", 32, 2, "full", "fused")}  # a CPU check of this script


class _Cfg(dict):
    """`ConfigDict`-like attribute access for the optimizer config."""
    __getattr__ = dict.__getitem__


class _Task:
    """The classification loss of `crate_jax.classify.task` on already-normalised images."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def loss(self, model, batch, rng, extras):
        logits = model(batch["image"], train=True, rng=rng).astype(jnp.float32)
        labels = jax.nn.one_hot(batch["label"], self.num_classes)
        loss = -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1).mean()
        return loss, {}, None


def run_case(name: str, steps: int, warmup: int, peak_measured: float) -> dict:
    from flax import nnx
    from crate_jax.models import build_model, model_config
    from crate_jax.models.flops import train_flops
    from crate_jax.train.optim import build_optimizer
    from crate_jax.train.step import make_train_step
    model, variant, res, batch, remat, attention = {**CASES, **SMOKE}[name]
    cfg = model_config(model, variant, image_size=res, num_classes=1000, dtype="bfloat16", remat=remat,
                       attention=attention)
    graphdef, params, buffers = nnx.split(build_model(cfg, 0), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    optim = _Cfg(name="adamw", lr=1e-3, min_lr=0.0, warmup_steps=10, b1=0.9, b2=0.95, mu_dtype=None, wd=0.1,
                 wd_mask=r".*kernel", clip=1.0, freeze=[])
    tx, lr_fn = build_optimizer(optim, params, 1000)
    step_fn = make_train_step(graphdef, _Task(1000), tx, lr_fn, seed=0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if nnx.to_pure_dict(buffers):
        state["buffers"] = nnx.to_pure_dict(buffers)
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.standard_normal((batch, res, res, 3)), jnp.bfloat16),
            "label": jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)}
    t = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, data).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    for _ in range(warmup):
        state, m = compiled(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops = float(train_flops(cfg)) * batch
    return {"case": name, "model": model, "variant": variant, "res": res, "batch": batch, "remat": remat,
            "attention": attention, "step_ms": 1e3 * step_s, "examples_per_s": batch / step_s,
            "train_tflop_analytic": flops / 1e12, "train_tflop_xla": float(cost.get("flops", 0)) / 1e12,
            "mfu_vs_h200_peak": flops / step_s / H200_BF16_PEAK, "mfu_vs_measured_matmul": flops / step_s / peak_measured,
            "compile_s": compile_s, "loss": float(m["train/loss"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per case after compiling")
    ap.add_argument("--out", help="directory for gpu_step.jsonl")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    n = 8192 if dev.platform == "gpu" else 1024
    from crate_jax.train.metrics import measure_matmul_peak
    peak = measure_matmul_peak(n, repeats=10, dtype="bfloat16")
    print(f"jax {jax.__version__} on {dev.platform} {dev.device_kind}; bf16 {n}^3 matmul measured now: "
          f"{peak / 1e12:.0f} TFLOP/s ({100 * peak / H200_BF16_PEAK:.0f}% of the 989 TFLOP/s H200 peak)", flush=True)
    out = Path(args.out) / "gpu_step.jsonl" if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"matmul_tflops": peak / 1e12, "jax": jax.__version__,
                                   "device": dev.device_kind}) + "\n")
    for name in args.cases.split(","):
        try:
            r = run_case(name, args.steps, args.warmup, peak)
        except Exception as e:  # noqa: BLE001 - report the case, go on with the next
            r = {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{name}: FAILED {r['error']}", flush=True)
        else:
            print(f"{name:<22} {r['variant']} @ {r['res']} px batch {r['batch']} remat {r['remat']:<4} "
                  f"{r['attention']:<8}: {r['step_ms']:7.1f} ms, {r['examples_per_s']:8.0f} ex/s, MFU "
                  f"{100 * r['mfu_vs_h200_peak']:.1f}% of peak, {100 * r['mfu_vs_measured_matmul']:.1f}% of the "
                  f"measured matmul (compile {r['compile_s']:.0f} s)", flush=True)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
