"""Every shipped recipe's layout, chosen by compiling it: `aot --plan` and `aot --smallest` for each recipe.

    python bench/plan_recipes.py plan --topology v5p-128            # each recipe's ranked plan on the slice
    python bench/plan_recipes.py smallest --topology v5p-128        # the smallest slice of that generation
    python bench/plan_recipes.py table                              # the markdown tables in bench/RESULTS.md

Each run is one `python -m crate_jax.aot` process per recipe (libtpu, compile-only: the `aot` extra), whose
JSON lands in `--out` (default `bench/plans/`, `<recipe>__<slice>.json` and `<recipe>__smallest-<gen>.json`);
a recipe whose file exists is skipped, so an interrupted run resumes where it stopped; `plan --add` compiles
anyway and adds the new layouts to the file (another remat, say), ranked with the ones there. `--only a,b` limits
the recipes. `smallest` starts each walk at the slice the recipe's plan predicts (its lowest-memory fitting
layout's bytes scaled as 1/chips), so it needs the plan for a slice of the same generation first; without
one it starts in the middle. A recipe's config string reads no data: the CLIPA recipes are given
placeholder shards and init and a generated vocabulary, the classifiers their class count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_CLIPA = "shards=unused.tar,vocab={vocab},init=unused"

# name -> (config, extra aot arguments). The names are the table's rows, in its order.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "in21k_B16": ("configs/imagenet21k.py:variant=B/16", ["--num-classes", "19167"]),
    "in21k_L14": ("configs/imagenet21k.py:variant=L/14", ["--num-classes", "19167"]),
    "in21k_L8": ("configs/imagenet21k.py:variant=L/8", ["--num-classes", "19167"]),
    "in1k_ft_L14": ("configs/imagenet1k.py:variant=L/14,init=unused", []),
    "clipa_B16_pt": ("configs/clipa.py:variant=B/16,stage=pretrain," + _CLIPA, []),
    "clipa_L14_pt": ("configs/clipa.py:variant=L/14,stage=pretrain," + _CLIPA, []),
    "clipa_H14_pt": ("configs/clipa.py:variant=H/14,stage=pretrain," + _CLIPA, []),
    "clipa_B16_ft": ("configs/clipa.py:variant=B/16,stage=finetune," + _CLIPA, []),
    "clipa_L14_ft": ("configs/clipa.py:variant=L/14,stage=finetune," + _CLIPA, []),
    "clipa_H14_ft": ("configs/clipa.py:variant=H/14,stage=finetune," + _CLIPA, []),
    # nanoGPT's 480 sequences do not divide over 128 or 64 data-parallel chips: tensor parallelism 4 or 8.
    "lm_B": ("configs/lm.py:model=crate_alpha,variant=B", ["--plan-tensor", "4,8"]),
    "simdino_B16": ("configs/simdino.py:model=crate_alpha,variant=B/16", []),
    "mae_B16": ("configs/mae.py:variant=B/16", []),
}


def _vocab(tmp: str) -> str:
    """A WordPiece vocabulary with no repeated token, enough for the text tower to build."""
    path = os.path.join(tmp, "vocab.txt")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return path


def _aot(recipe: str, topology: str, mode: list[str], out: str, vocab: str, more: list[str]) -> int:
    config, extra = RECIPES[recipe]
    extra = extra + more
    if mode[0] == "--smallest":  # the plan's search options do not apply
        extra = [a for i, a in enumerate(extra) if not (a.startswith("--plan-") or
                                                          (i and extra[i - 1].startswith("--plan-")))]
    cmd = [sys.executable, "-m", "crate_jax.aot", "--config", config.format(vocab=vocab), "--topology", topology,
           *mode, "--plan-json", out, *extra]
    print(f"=== {recipe} {topology} {' '.join(mode)}", flush=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:  # the plan's lines as they come, not libtpu's start-up noise
            if line.startswith(("  ", "best:", "smallest:", "does not fit", "error:", "config error")):
                print(line.rstrip(), flush=True)
    if os.path.exists(out):  # the file names the recipe as the table shows it, not this run's temporary vocab
        doc = json.load(open(out))
        doc["config"] = config.format(vocab="VOCAB.txt")
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    return proc.returncode


def _start(out: str, recipe: str, generation: str) -> str | None:
    """The slice the recipe's plan on a `generation` slice predicts as the smallest (or None)."""
    from crate_jax.parallel import plan as P
    from crate_jax.parallel.tpu_slices import parse, smaller_slices
    for name in sorted(os.listdir(out)):
        if not (name.startswith(recipe + "__" + generation) and name.endswith(".json")) or "smallest" in name:
            continue
        doc = json.load(open(os.path.join(out, name)))
        target = parse(doc["topology"])
        fitting = [r for r in doc["plan"] if r["fits"]]
        if not fitting:
            continue
        low = min(fitting, key=lambda r: r["total_bytes"])
        sizes = {s.chips: s for s in smaller_slices(target)}
        chips = P.predicted_start(low["total_bytes"], target.chips, target.hbm_bytes, sizes)
        return sizes[chips].accelerator_type
    return None


def _layout(row: dict) -> tuple:
    return row["data"], row["fsdp"], row["tensor"], row["remat"], row["microbatches"]


def merge(doc: dict, new: dict) -> dict:
    """`doc`'s plan with `new`'s compiles added (a layout compiled again keeps the new row, fitting or not), ranked
    as `aot --plan` ranks (`crate_jax.parallel.plan.rank`): fitting layouts first by their bound, then the rest by
    how far over HBM they are."""
    if (doc["topology"], doc["config"]) != (new["topology"], new["config"]):
        raise ValueError(f"cannot merge a plan of {new['config']} on {new['topology']} into one of {doc['config']} "
                         f"on {doc['topology']}")
    from crate_jax.parallel.plan import rank_key
    rows = {_layout(r): r for r in doc["plan"]}
    rows.update({_layout(r): r for r in new["plan"]})
    return dict(doc, plan=sorted(rows.values(), key=lambda r: rank_key(r["fits"], r["bound_s"], r["total_bytes"])))


def run(mode: str, topology: str, out: str, only: list[str], more: list[str], add: bool = False) -> int:
    from crate_jax.parallel.tpu_slices import parse
    target = parse(topology)
    os.makedirs(out, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        vocab = _vocab(tmp)
        for recipe in only or RECIPES:
            if mode == "plan":
                path = os.path.join(out, f"{recipe}__{target.accelerator_type}.json")
                args = ["--plan"]
            else:
                path = os.path.join(out, f"{recipe}__smallest-{target.generation}.json")
                start = _start(out, recipe, target.generation)
                args = ["--smallest"] + (["--smallest-start", start] if start else [])
            if os.path.exists(path) and not add:
                continue
            into = path if not os.path.exists(path) else os.path.join(tmp, os.path.basename(path))
            code = _aot(recipe, topology, args, into, vocab, more)
            if not os.path.exists(into):
                failed.append(f"{recipe} (exit {code})")
            elif into != path:  # --add: this run's layouts join the recipe's plan
                try:
                    merged = merge(json.load(open(path)), json.load(open(into)))
                except ValueError as e:
                    print(f"error: {path}: {e}", flush=True)
                    failed.append(f"{recipe} (not merged)")
                    continue
                with open(path + ".tmp", "w") as f:
                    json.dump(merged, f, indent=1)
                os.replace(path + ".tmp", path)
    if failed:
        print(f"no result for: {', '.join(failed)}")
    return 1 if failed else 0


def _cell(r: dict) -> str:
    if not r["fits"]:
        return f"{r['name']}: does not fit"
    return (f"{r['name']}: {r['total_bytes'] / 2**30:.1f} GiB, {1e3 * r['bound_s']:.1f} ms, {r['binding']}, "
            f"{100 * r['mfu']:.0f} %")


def table(out: str) -> str:
    """Per recipe and slice: the best layout, its numbers, the runner-up, and the smallest slice."""
    docs = {n[:-5]: json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out)) if n.endswith(".json")}
    rows = ["| recipe | slice | best layout | per-chip HBM GiB | step bound ms | binds | MFU at bound | "
            "next best (GiB, ms, binds, MFU) | layouts compiled, compile time |", "|---|---|---|---|---|---|---|---|---|"]
    small = ["| recipe | smallest slice | layout | per-chip HBM GiB | step bound ms | binds | compiles |",
             "|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        for key, doc in docs.items():
            if not key.startswith(recipe + "__"):
                continue
            if "smallest" in key:
                best = next((r for r in doc["tried"] if r["fits"] and r["slice"] == doc["smallest"]), None)
                small.append(f"| {recipe} | {doc['smallest'] or 'none up to ' + doc['topology']} | "
                             f"{best['name'] if best else ''} | "
                             f"{'' if not best else format(best['total_bytes'] / 2**30, '.1f')} | "
                             f"{'' if not best or best['bound_s'] is None else format(1e3 * best['bound_s'], '.1f')}"
                             f" | {best['binding'] if best else ''} | "
                             + ", ".join(f"{r['slice']} {'fits' if r['fits'] else 'no'}"
                                         + (f" ({r['microbatches']} mb)" if r['microbatches'] > 1 else "")
                                         for r in doc["tried"]) + " |")
                continue
            fit = [r for r in doc["plan"] if r["fits"]]
            best = fit[0] if fit else None
            nxt = _cell(fit[1]) if len(fit) > 1 else ""
            compiled = (f"{len(doc['plan'])} ({len(fit)} fit), "
                        f"{sum(r['compile_s'] for r in doc['plan']):.0f} s")
            if best is None:
                rows.append(f"| {recipe} | {doc['topology']} | nothing fits | | | | | | {compiled} |")
                continue
            rows.append(f"| {recipe} | {doc['topology']} | **{best['name']}** | {best['total_bytes'] / 2**30:.1f} | "
                        f"{1e3 * best['bound_s']:.1f} | {best['binding']} | {100 * best['mfu']:.0f} % | {nxt} | "
                        f"{compiled} |")
    return "\n".join(rows) + "\n\n" + "\n".join(small)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("plan", "smallest", "table"))
    p.add_argument("--topology", default="v5p-128", help="the slice to plan for (smallest: the largest tried)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "plans"), help="the folder of plan JSON files")
    p.add_argument("--only", default="", help="comma-separated recipe names (default: every recipe)")
    p.add_argument("--aot-args", default="", metavar="'ARGS'",
                   help="more arguments for each aot run, e.g. '--plan-remat full' to narrow a plan's search")
    p.add_argument("--add", action="store_true",
                   help="plan: compile even where the recipe's JSON exists and add these layouts to it (e.g. another "
                        "remat: --add --aot-args '--plan-remat dots'); without it an existing file is skipped")
    args = p.parse_args(argv)
    only = [r for r in args.only.split(",") if r]
    unknown = sorted(set(only) - set(RECIPES))
    if unknown:
        p.error(f"--only: unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    if args.mode == "table":
        print(table(args.out))
        return 0
    if args.add and args.mode != "plan":
        p.error("--add applies to plan (a smallest walk is one search, not a set of layouts)")
    return run(args.mode, args.topology, args.out, only, args.aot_args.split(), args.add)


if __name__ == "__main__":
    sys.exit(main())
