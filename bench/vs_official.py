"""Paired train-step timing: our step against the official code, in one process tree, A B A B order.

    # CRATE-α-B/16 @ 224 px, batch 8: ours vs the official JAX step (big_vision fork, one jitted step)
    python bench/vs_official.py --model crate_alpha --alpha-repo /tmp/official/CRATE-alpha
    # CRATE-T/16 @ 224 px, batch 16: ours vs a plain JAX port (bench/crate_port.py) vs the torch original
    python bench/vs_official.py --model crate --crate-repo /tmp/official/CRATE
    # ViT-B/16: the working tree against another copy of the code (e.g. `git archive HEAD | tar -x -C DIR`)
    python bench/vs_official.py --model vit --sides ours,baseline --baseline-code DIR
    # the same side twice with different settings: SIDE|VAR=VALUE|...
    python bench/vs_official.py --model crate --sides "ours,ours|XLA_FLAGS=--xla_cpu_use_onednn=true"

Each side runs in its own worker process (so torch, JAX and other code versions never share one
interpreter, and per-side environment variables such as XLA_FLAGS apply); the parent builds all of
them, warms them up (compile + `--warmup` steps), then asks each in turn for `--steps` steps, for
`--rounds` rounds: A B A B. It prints every side's median step time over all timed steps, the
per-round medians, and each side's speed relative to the first side (their median / its median; > 1
means the first side is faster), also as the median of the per-round ratios, which pairs steps that
ran close together in time (the better number on a machine shared with other work). The defaults,
6 rounds of 1 step, interleave the sides step by step. The same batch goes to every side: random images at `--res` (uint8 for our step, which
normalises on device; the same pixels normalised for the others) and random labels.

Sides:
* `ours`: our real train step (`crate_jax.train.setup.Setup`, the config of `bench/train_step.py`:
  AdamW b2 0.95, weight decay 0.1 on kernels, clip 1.0, warm-up + cosine, plus the loss, gradient and
  parameter norms and the finite flag as metrics).
* `baseline`: the same from the code at `--baseline-code`.
* `official`: CRATE-α from `--alpha-repo` (`models/crate.py`, train=True), the official optimizer
  chain (docs/math.md §Optimizer: clip 1.0 → scale_by_adam(0.9, 0.95) → weight decay 0.1 on `.../kernel` → lr →
  schedule → −1), the official measurements (l2 norms of gradients, parameters, updates), one jit.
* `port`: the plain JAX port of torch CRATE (`bench/crate_port.py`) with the same optimizer work.
* `torch`: torch CRATE from `--crate-repo` (`model/crate.py`), cross-entropy, `backward()`,
  `clip_grad_norm_(1.0)`, `AdamW(betas=(0.9, 0.95), weight_decay=0.1)`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_SIDES = {"crate_alpha": "ours,official", "crate": "ours,port,torch", "vit": "ours"}


# Workers ------------------------------------------------------------------------------------
def _images(args, rng):
    import numpy as np
    return rng.integers(0, 256, (args.batch, args.res, args.res, 3), dtype=np.uint8)


def _normalised(images_u8):
    import numpy as np
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    return (images_u8.astype(np.float32) - mean) / std


def _jax_stats(compiled, compile_s):
    """Cost-analysis summary, plus the optimised HLO under "hlo" (for bench/profile_step.py)."""
    sys.path.insert(0, str(BENCH))
    from compiled_stats import summary
    return dict(summary(compiled, compile_s), hlo=compiled.as_text())


def _ours(args):
    import jax
    import numpy as np
    sys.path.insert(0, str(BENCH))
    from train_step import config
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.setup import Setup
    cfg = config(args.model, args.variant, args.res, args.batch, args.dtype, args.remat)
    cfg.optim.update(clip=args.clip, wd=args.wd)
    if args.attention:
        cfg.model.attention = args.attention
    setup = Setup(cfg, make_mesh({"data": -1}))
    t = time.perf_counter()
    compiled = setup.compile()
    stats = _jax_stats(compiled, time.perf_counter() - t)
    state = setup.fresh_state()
    rng = np.random.default_rng(0)
    batch = {"image": jax.device_put(_images(args, rng), setup.batch_sh["image"]),
             "label": jax.device_put(rng.integers(0, 1000, (args.batch,)).astype(np.int32), setup.batch_sh["label"])}
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready(metrics)
    return step, stats


def _official_alpha(args):
    import re
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from official import alpha_module
    crate = alpha_module(args.alpha_repo)
    model = crate.Model(num_classes=1000, variant=args.variant)
    rng = np.random.default_rng(0)
    images = jnp.asarray(_normalised(_images(args, rng)))
    labels = jax.nn.one_hot(rng.integers(0, 1000, (args.batch,)), 1000)
    params = jax.jit(lambda: model.init(jax.random.key(0), images[:1])["params"])()
    names = jax.tree_util.tree_map_with_path(lambda p, _: "/".join(k.key for k in p), params)
    kernel_mask = jax.tree.map(lambda n: bool(re.fullmatch(r".*/kernel$", n)), names)
    warm, total = 10, 1000
    sched = lambda t: jnp.minimum(1.0, t / warm) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((t - warm) / (total - warm), 0, 1)))  # noqa: E731,E501
    tx = optax.chain(optax.clip_by_global_norm(args.clip) if args.clip else optax.identity(),
                     optax.scale_by_adam(b1=0.9, b2=0.95),
                     *([optax.add_decayed_weights(args.wd, kernel_mask)] if args.wd else []),
                     optax.scale(1e-3), optax.scale_by_schedule(sched), optax.scale(-1.0))
    opt = jax.jit(tx.init)(params)

    def update_fn(params, opt, rng, images, labels):  # main.py's update_fn on one device (no pmean)
        rng, rng_model, rng_drop_path = jax.random.split(rng, 3)

        def loss_fn(params):
            logits, _ = model.apply({"params": params}, images, train=True,
                                    rngs={"dropout": rng_model, "drop_path": rng_drop_path})
            return jnp.mean(-jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        l2 = lambda tree: jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))  # noqa: E731
        return params, opt, rng, loss, {"l2_grads": l2(grads), "l2_params": l2(params), "l2_updates": l2(updates)}

    key = jax.random.key(1)
    t = time.perf_counter()
    compiled = jax.jit(update_fn, donate_argnums=(0, 1)).lower(params, opt, key, images, labels).compile()
    stats = _jax_stats(compiled, time.perf_counter() - t)
    box = [params, opt, key]

    def step():
        box[0], box[1], box[2], loss, m = compiled(box[0], box[1], box[2], images, labels)
        jax.block_until_ready((loss, m))
    return step, stats


def _port(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import crate_port as port
    from crate_jax.models.config import CRATE_VARIANTS, parse_variant
    name, patch = parse_variant("crate", args.variant)
    d, depth, heads, _ = CRATE_VARIANTS[name]
    dims = port.CrateDims(dim=d, depth=depth, heads=heads, patch=patch, image_size=args.res)
    tx = port.optimizer(clip=args.clip, wd=args.wd)
    params = jax.jit(lambda: port.init_params(jax.random.key(0), dims))()
    opt = jax.jit(tx.init)(params)
    rng = np.random.default_rng(0)
    images = jnp.asarray(_normalised(_images(args, rng)))
    labels = jnp.asarray(rng.integers(0, 1000, (args.batch,)).astype(np.int32))
    t = time.perf_counter()
    compiled = port.make_step(dims, tx).lower(params, opt, images, labels).compile()
    stats = _jax_stats(compiled, time.perf_counter() - t)
    box = [params, opt]

    def step():
        box[0], box[1], loss = compiled(box[0], box[1], images, labels)
        loss.block_until_ready()
    return step, stats


def _torch(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from official import torch_crate_module
    crate = torch_crate_module(args.crate_repo)
    from crate_jax.models.config import CRATE_VARIANTS, parse_variant
    name, patch = parse_variant("crate", args.variant)
    d, depth, heads, _ = CRATE_VARIANTS[name]
    torch.manual_seed(0)
    model = crate.CRATE(image_size=args.res, patch_size=patch, num_classes=1000, dim=d, depth=depth, heads=heads,
                        dim_head=d // heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=args.wd)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(_normalised(_images(args, rng)).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(rng.integers(0, 1000, (args.batch,)))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
    return step, {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}


BUILDERS = {"ours": _ours, "baseline": _ours, "official": _official_alpha, "port": _port, "torch": _torch}


def worker(args) -> int:
    """Builds one side, warms it up, then answers `run N` lines on stdin with one JSON line of N step times."""
    sys.path.insert(0, str(BENCH))
    step, stats = BUILDERS[args.worker](args)
    stats.pop("hlo", None)
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": stats}), flush=True)
    for line in sys.stdin:
        cmd, n = line.split()
        if cmd != "run":
            break
        times = []
        for _ in range(int(n)):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(json.dumps({"times": times}), flush=True)
    return 0


# Parent -------------------------------------------------------------------------------------
def _parse_side(spec: str):
    name, *env = spec.split("|")
    if name not in BUILDERS:
        raise SystemExit(f"unknown side {name!r}; sides are {sorted(BUILDERS)}")
    return name, dict(e.split("=", 1) for e in env)


class Side:
    def __init__(self, spec: str, args, passthrough: list[str]):
        self.spec = spec
        name, env_extra = _parse_side(spec)
        env = dict(os.environ, **env_extra)
        code = Path(args.baseline_code).resolve() if name == "baseline" else REPO
        if name == "baseline" and not (code / "crate_jax").is_dir():
            raise SystemExit("the baseline side needs --baseline-code DIR holding another copy of crate_jax")
        env["PYTHONPATH"] = os.pathsep.join([str(code), str(BENCH)] + env.get("PYTHONPATH", "").split(os.pathsep))
        cmd = [sys.executable, str(BENCH / "vs_official.py"), "--worker", name] + passthrough
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=code)
        self.times: list[float] = []
        self.rounds: list[float] = []
        self.stats = None

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"side {self.spec!r} exited (status {self.proc.wait()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def ready(self):
        self.stats = self._reply()["ready"]

    def run(self, n: int):
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        times = self._reply()["times"]
        self.times += times
        self.rounds.append(statistics.median(times))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _stats_line(stats: dict) -> str:
    if "gbytes" not in stats:
        return ", ".join(f"{k} {v}" for k, v in stats.items())
    largest = stats["largest"][0] if stats["largest"] else (0, 0)
    return (f"{stats['gflops']:.1f} GFLOP, {stats['gbytes']:.2f} GB accessed, temps {stats['temp_mib']:.0f} MiB, "
            f"{stats['fusions_over_100']} fused kernels > 100 instr (largest {largest[0]}), "
            f"compile {stats['compile_s']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="crate_alpha", choices=sorted(DEFAULT_SIDES), help="model family")
    ap.add_argument("--variant", help="default B/16 for crate_alpha and vit, T/16 for crate")
    ap.add_argument("--res", type=int, default=224, help="image resolution in pixels")
    ap.add_argument("--batch", type=int, help="default 8 for crate_alpha and vit, 16 for crate")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ap.add_argument("--remat", default="none", help="config.model.remat of our side (none: no rematerialisation)")
    ap.add_argument("--attention", default="", help="override our model's attention path (fused, explicit)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip of every side's optimizer (0: none)")
    ap.add_argument("--wd", type=float, default=0.1, help="weight decay of every side's optimizer (0: none)")
    ap.add_argument("--sides", help=f"comma-separated, SIDE[|VAR=VALUE...]; defaults {DEFAULT_SIDES}")
    ap.add_argument("--alpha-repo", help="checkout of UCSC-VLAA/CRATE-alpha (side 'official')")
    ap.add_argument("--crate-repo", help="checkout of Ma-Lab-Berkeley/CRATE (side 'torch')")
    ap.add_argument("--baseline-code", help="another copy of this repository (side 'baseline')")
    ap.add_argument("--rounds", type=int, default=6, help="0: only compile and print each side's statistics")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variant = args.variant or ("T/16" if args.model == "crate" else "B/16")
    args.batch = args.batch or (16 if args.model == "crate" else 8)
    if args.worker:
        return worker(args)

    passthrough = [f"--model={args.model}", f"--variant={args.variant}", f"--res={args.res}", f"--batch={args.batch}",
                   f"--dtype={args.dtype}", f"--remat={args.remat}", f"--clip={args.clip}", f"--wd={args.wd}",
                   f"--warmup={args.warmup}", f"--attention={args.attention}"]
    for flag in ("alpha_repo", "crate_repo", "baseline_code"):
        if getattr(args, flag):
            passthrough.append(f"--{flag.replace('_', '-')}={Path(getattr(args, flag)).resolve()}")
    specs = (args.sides or DEFAULT_SIDES[args.model]).split(",")
    if any(_parse_side(s)[0] == "official" for s in specs) and not args.alpha_repo:
        raise SystemExit("side 'official' needs --alpha-repo (a checkout of UCSC-VLAA/CRATE-alpha)")
    if any(_parse_side(s)[0] == "torch" for s in specs) and not args.crate_repo:
        raise SystemExit("side 'torch' needs --crate-repo (a checkout of Ma-Lab-Berkeley/CRATE)")
    print(f"{args.model} {args.variant} @ {args.res} px, batch {args.batch}, {args.dtype}, clip {args.clip}, "
          f"wd {args.wd}; {args.rounds} rounds x {args.steps} steps per side, A B A B; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    sides = []
    load_before = _load()
    try:
        for spec in specs:  # build and warm up one at a time: compiles do not compete for the cores
            side = Side(spec, args, passthrough)
            side.ready()
            sides.append(side)
            print(f"  {spec:<28} ready: {_stats_line(side.stats)}", flush=True)
        for _ in range(args.rounds):
            for side in sides:
                side.run(args.steps)
    finally:
        for side in sides:
            side.close()
    if not args.rounds:  # `--rounds 0`: compile statistics only
        return 0
    ref = statistics.median(sides[0].times)
    results = []
    print(f"  load average during the run: {load_before} -> {_load()}")
    for side in sides:
        med = statistics.median(side.times)
        paired = statistics.median(t / r for t, r in zip(side.rounds, sides[0].rounds))
        rounds = " ".join(f"{1e3 * r:.0f}" for r in side.rounds)
        print(f"  {side.spec:<28} median {1e3 * med:8.0f} ms over {len(side.times)} steps; "
              f"{sides[0].spec} speed / this: {med / ref:.2f}x (median of per-round ratios {paired:.2f}x); "
              f"rounds: {rounds} ms")
        results.append({"side": side.spec, "median_s": med, "times_s": side.times, "round_medians_s": side.rounds,
                        "stats": side.stats, "speed_of_first_vs_this": med / ref, "paired_ratio": paired})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
