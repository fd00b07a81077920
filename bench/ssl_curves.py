"""Learning curves of the self-supervised demo: k-NN and linear-probe accuracy of SimDINO's and DINO's teachers
against training steps, over seeds, next to the same networks at their random initialisation.

    python bench/ssl_curves.py --workdir runs/ssl_curves --methods simdino,dino --steps 100,300 --seeds 0,1,2

The configs are the demo's (`crate_jax.demos.ssl.simdino_config`: CRATE-α width 64, depth 4, on the bundled
MNIST digits); `dino` is the same run with `loss=dino` (`configs/simdino.py`), `--prototypes` prototypes.
Writes `WORKDIR/curves.json`: per method and step budget (0 = the random init), `knn_top1` and `linear_top1`
as `{"mean", "std", "seeds", "values"}`. Re-running resumes finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def config(method: str, steps: int, seed: int, prototypes: int):
    from crate_jax.demos import ssl as demo
    c = demo.simdino_config(steps, 64)
    if method == "dino":
        from crate_jax.configs import simdino
        d = simdino.get_config(f"steps={steps},batch=64,loss=dino,out_dim={prototypes}")
        c.loss = d.loss
        c.model.update(prototypes=prototypes, norm_last_layer=True)
        c.optim.freeze_steps = list(d.optim.freeze_steps)
    c.seed = seed
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="root of the runs and of curves.json")
    ap.add_argument("--methods", default="simdino,dino", help="comma-separated, from simdino, dino")
    ap.add_argument("--steps", default="300", help="comma-separated step budgets (0, the random init, is always added)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--prototypes", type=int, default=1024, help="DINO's prototype count (--methods dino)")
    args = ap.parse_args(argv)
    from crate_jax.demos import ssl as demo
    wd = Path(args.workdir)
    out_file = wd / "curves.json"
    raw = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for method in args.methods.split(","):
        for steps in [0] + [int(s) for s in args.steps.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                key = f"{method}/{steps}/{seed}"
                if key in raw:
                    continue
                c = config(method, max(steps, 1), seed, args.prototypes)
                m = (demo.at_init(f"{key} init", c) if steps == 0 else
                     demo.train(key, c, wd / method / f"steps{steps}_seed{seed}"))
                raw[key] = {"knn_top1": m["eval/knn/top1"], "linear_top1": m["eval/linear/top1"]}
                wd.mkdir(parents=True, exist_ok=True)
                out_file.write_text(json.dumps(raw, indent=1, sort_keys=True))
    summary = {}
    for key, v in raw.items():
        method, steps, _ = key.split("/")
        for metric, value in v.items():
            summary.setdefault(f"{method}/{steps}", {}).setdefault(metric, []).append(value)
    print(f"{'method/steps':<16} {'k-NN top-1':>18} {'linear top-1':>18}  seeds")
    for k in sorted(summary, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
        s = summary[k]
        cell = lambda x: f"{100 * np.mean(x):5.1f} ± {100 * np.std(x):4.1f} %"
        print(f"{k:<16} {cell(s['knn_top1']):>18} {cell(s['linear_top1']):>18}  {len(s['knn_top1'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
