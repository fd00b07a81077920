"""Learning curves of the self-supervised demo: k-NN and linear-probe accuracy of SimDINO's and DINO's teachers and
of the CRATE-MAE encoder against training steps, over seeds, next to the same networks at their random
initialisation (step 0).

    python bench/ssl_curves.py --workdir runs/ssl_curves --methods simdino,dino,mae --steps 150,300,600,1200 --seeds 0,1,2

The configs are the demo's (`crate_jax.demos.ssl`: `simdino_config`, `dino_config`, `mae_config`; CRATE width 64,
depth 4 on the bundled MNIST digits), with the step budget changed (the lr schedule follows it). `--model`
swaps the SimDINO / DINO backbone (crate | crate_alpha | vit). Writes `WORKDIR/curves.json`: per method and
step budget, `knn_top1` and `linear_top1` as `{"mean", "std", "seeds", "values"}`. Re-running resumes
finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(method: str, steps: int, seed: int, model: str, lmbda: float):
    from crate_jax.demos import ssl as demo
    if method == "mae":
        return demo.mae_config(max(steps, 1), seed=seed)
    return demo.ssl_config(max(steps, 1), loss=method, seed=seed, model=model, lmbda=lmbda)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="root of the runs and of curves.json")
    ap.add_argument("--methods", default="simdino,dino,mae", help="comma-separated, from simdino, dino, mae")
    ap.add_argument("--steps", default="300", help="comma-separated step budgets (0, the random init, is always added)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--model", default="crate", help="the SimDINO / DINO backbone: crate, crate_alpha or vit")
    ap.add_argument("--lmbda", type=float, default=0.5, help="the CRATE backbone's ISTA threshold λ (SimDINO / DINO)")
    args = ap.parse_args(argv)
    from crate_jax.demos import ssl as demo
    wd = Path(args.workdir)
    out_file = wd / "curves.json"
    raw = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for method in args.methods.split(","):
        for steps in [0] + [int(s) for s in args.steps.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                tag = "" if method == "mae" else ("" if args.model == "crate" else "-" + args.model) + \
                    ("" if args.model != "crate" or args.lmbda == 0.5 else f"-lambda{args.lmbda:g}")
                key = f"{method}{tag}/{steps}/{seed}"
                if key in raw:
                    continue
                c = config(method, steps, seed, args.model, args.lmbda)
                m = (demo.at_init(f"{key} init", c) if steps == 0 else
                     demo.train(key, c, wd / key.split("/")[0] / f"steps{steps}_seed{seed}"))
                raw[key] = {"knn_top1": m["eval/knn/top1"], "linear_top1": m["eval/linear/top1"]}
                wd.mkdir(parents=True, exist_ok=True)
                out_file.write_text(json.dumps(raw, indent=1, sort_keys=True))
    values = {}
    for key, v in raw.items():
        method, steps, _ = key.split("/")
        for metric, value in v.items():
            values.setdefault(f"{method}/{steps}", {}).setdefault(metric, []).append(value)
    summary = {k: {m: demo.spread(v) for m, v in by_metric.items()} for k, by_metric in values.items()}
    (wd / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(f"{'method/steps':<20} {'k-NN top-1':>18} {'linear top-1':>18}  seeds (mean ± std over seeds, ddof 1)")
    for k in sorted(summary, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
        cell = lambda s: f"{100 * s['mean']:5.1f} ± {100 * (s['std'] or 0):4.1f} %"
        print(f"{k:<20} {cell(summary[k]['knn_top1']):>18} {cell(summary[k]['linear_top1']):>18}  "
              f"{summary[k]['knn_top1']['seeds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
