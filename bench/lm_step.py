"""Language-model train-step throughput (tokens/s, MFU) and decoding cache memory, CRATE-GPT / CRATE-α LM / GPT-2
at GPT-2-small size (width 768, depth 12, 12 heads, vocab 50257 padded to 50304, block 1024), in one run.

    python bench/lm_step.py                                  # CPU: batch 1, float32, 2 timed steps
    python bench/lm_step.py --batch 16 --dtype bfloat16 --steps 10 --decode-batch 8    # a GPU (e.g. one H100)

It times the real sharded train step of `configs/lm.py` (`crate_jax.train.setup.Setup`, AdamW, clip, the
recipe's weight decay) on random tokens; nothing is downloaded. MFU is against a float32 matmul peak
measured in this process on CPU, and against `--peak-tflops` (the accelerator's dense bf16 peak) when given.
FLOPs per token: `6N + 12·depth·d·T` with N counting each use of a weight matrix
(`crate_jax.models.lm.train_flops_per_token`; CRATE's ISTA uses its dictionary three times, the ODL block
`D` three times and `D1` once).

Decoding: the cache tensors of each model at `--decode-batch` × block (one per layer for MSSA, q = k = v;
two for GPT-2), the compiled generate program's temporary memory, and the per-token decode time.
Timings on a shared CPU are noisy: compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.metrics import measure_matmul_peak
from crate_jax.train.setup import Setup, memory_report

MODELS = ("crate_gpt", "crate_alpha", "gpt2")
SIZE = dict(crate_gpt="crate", crate_alpha="B", gpt2="gpt2")  # all 12 layers × 768 wide × 12 heads


def config(model: str, batch: int, block: int, dtype: str, remat: str):
    from crate_jax.configs import lm
    c = lm.get_config(f"model={model},variant={SIZE[model]},vocab=50257,block={block},batch={batch},steps=1000,"
                      f"dtype={dtype},remat={remat}")
    c.evals = {}
    return c


def time_step(model: str, a) -> dict:
    setup = Setup(config(model, a.batch, a.block, a.dtype, a.remat), make_mesh({"data": -1}))
    t = time.perf_counter()
    compiled = setup.compile()
    compile_s = time.perf_counter() - t
    state = setup.fresh_state(load_init=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, (a.batch, a.block + 1), dtype=np.int32)
    batch = {"tokens": jax.device_put(tokens, setup.batch_sh["tokens"])}
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    from crate_jax.models.lm import param_count
    cfg = setup.task.model_cfg
    return dict(step_s=float(np.median(times)), compile_s=compile_s, memory=memory_report(compiled),
                flops_per_token=setup.task.flops_per_example() / a.block, cfg=cfg,
                params=param_count(cfg.replace(vocab_multiple=1)))  # without the 47 padding rows of the table


def decode_stats(cfg, a) -> dict:
    """Cache bytes, the compiled generate program's memory, and seconds per new token (greedy)."""
    from crate_jax.models import lm_decode
    from crate_jax.models.lm import build_lm
    from flax import nnx
    cfg = cfg.replace(scan=True)
    model = build_lm(cfg, 0)
    graphdef, state = nnx.split(model)
    B, P, N = a.decode_batch, 16, a.decode_tokens
    fn = lm_decode._generate_fn(graphdef, cfg, B, P, N, 0.0, None, cfg.block_size)  # the cache spans the block
    prompt = np.zeros((B, P), np.int32)
    comp = fn.lower(state, prompt, jax.random.key(0)).compile()
    mem = comp.memory_analysis()
    comp(state, prompt, jax.random.key(0)).block_until_ready()
    t = time.perf_counter()
    comp(state, prompt, jax.random.key(0)).block_until_ready()
    per_token = (time.perf_counter() - t) / N
    return dict(cache=lm_decode.cache_bytes(cfg, B), names=lm_decode.cache_names(cfg),
                temp=None if mem is None else mem.temp_size_in_bytes, per_token_s=per_token)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="sequences per train step")
    ap.add_argument("--block", type=int, default=1024, help="sequence length in tokens")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ap.add_argument("--remat", default="none", help="config.model.remat of the recipe (none: no rematerialisation)")
    ap.add_argument("--steps", type=int, default=2, help="timed train steps per model")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, from crate_gpt, crate_alpha, gpt2")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak (e.g. 989 for H100 bf16 dense)")
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences decoded at once")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens decoded per sequence")
    ap.add_argument("--no-decode", action="store_true", help="time the train step only")
    a = ap.parse_args(argv)
    measured = measure_matmul_peak(2048 if jax.default_backend() == "cpu" else 8192) * jax.device_count()
    peak = a.peak_tflops * 1e12 * jax.device_count() if a.peak_tflops else measured
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {jax.device_count()} devices; float32 "
          f"matmul peak measured now: {measured / 1e9:.1f} GFLOP/s; MFU against "
          f"{'--peak-tflops ' + str(a.peak_tflops) + ' TFLOP/s' if a.peak_tflops else 'the measured peak'}")
    results = {}
    for model in [m for m in a.models.split(",") if m]:
        r = time_step(model, a)
        tps = a.batch * a.block / r["step_s"]
        r["tokens_per_s"], r["mfu"] = tps, tps * r["flops_per_token"] / peak
        results[model] = r
        print(f"{model:<12} {r['params']:,} params, batch {a.batch}×{a.block} {a.dtype}: "
              f"step {r['step_s'] * 1e3:.0f} ms, "
              f"{tps:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% ({r['flops_per_token'] / 1e9:.3f} GFLOP/token; "
              f"compile {r['compile_s']:.0f}s); {r['memory']}", flush=True)
    if "gpt2" in results:
        for model in results:
            if model != "gpt2":
                print(f"step-time ratio {model} / gpt2: {results[model]['step_s'] / results['gpt2']['step_s']:.2f} "
                      f"(FLOP ratio {results[model]['flops_per_token'] / results['gpt2']['flops_per_token']:.2f})")
    if a.no_decode:
        return
    for model, r in results.items():
        s = decode_stats(r["cfg"], a)
        temp = "n/a" if s["temp"] is None else f"{s['temp'] / 2 ** 20:.1f} MiB"
        print(f"decode {model:<12} cache {'+'.join(s['names'])} [{r['cfg'].depth}, {a.decode_batch}, {a.block}, "
              f"{r['cfg'].num_heads}, {r['cfg'].head_dim}] {a.dtype} = {s['cache'] / 2 ** 20:.1f} MiB; "
              f"generate program "
              f"temporaries {temp}; {s['per_token_s'] * 1e3:.1f} ms per new token (batch {a.decode_batch})", flush=True)


if __name__ == "__main__":
    main()
