"""Where a train step's time goes, per XLA:CPU kernel: a `jax.profiler` trace of a few steps, summed
per kernel and per kind of kernel (matmul, reduction, transpose / copy, elementwise, ...).

    python bench/profile_step.py --model crate_alpha --sides ours,official --alpha-repo /tmp/official/CRATE-alpha
    python bench/profile_step.py --model crate --sides ours,port --steps 2 --top 15

Sides are those of `bench/vs_official.py`; each is built in this process, warmed up, then traced for
`--steps` steps. JAX sides (`ours`, `official`, `port`): one `jax.profiler.trace` (Perfetto JSON); a
kernel's kind comes from the optimised HLO, the instructions of its fused computation. The `torch`
side (`--crate-repo`): `torch.profiler`, self CPU time per aten operator, grouped the same way. Times
are summed over the threads that ran a kernel, so they are CPU time; per-kind totals are per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vs_official  # noqa: E402

_MOVES = {"dynamic-update-slice", "pad", "concatenate", "slice", "dynamic-slice"}
_FREE = {"parameter", "bitcast", "broadcast", "constant", "reshape", "tuple", "get-tuple-element"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def kernel_kinds(hlo_text: str) -> dict[str, str]:
    """`{instruction name: kind}` for the entry computation's instructions (fusions by their contents)."""
    bodies, current, entry, kinds = collections.defaultdict(set), None, False, {}
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            current = line.split(" ")[0].lstrip("%") if line.rstrip().endswith("{") else None
            entry = line.startswith("ENTRY")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if current and not entry:
            bodies[current].add(m.group(2))
        elif entry:
            calls = _CALLS.search(line)
            kinds[m.group(1)] = (m.group(2), calls.group(1) if calls else None)
    out = {}
    for name, (op, called) in kinds.items():
        ops = bodies.get(called, set()) if op == "fusion" else {op}
        if ops & {"dot", "convolution"}:
            out[name] = "matmul"
        elif "reduce" in ops:
            out[name] = "reduction"
        elif ops & {"transpose", "copy"}:
            out[name] = "transpose/copy"
        elif ops & _MOVES and ops <= _MOVES | _FREE:
            out[name] = "slice/pad/concat"
        elif op == "fusion":
            out[name] = "elementwise"
        else:
            out[name] = op
    return out


def kernel_shapes(hlo_text: str) -> dict[str, str]:
    """`{entry instruction: "result shape <- operand names"}`, to tell kernels apart in the listing."""
    out = {}
    for line in hlo_text.split("\nENTRY", 1)[-1].splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\((.*?)\)", line)
        if m:
            out[m.group(1)] = f"{m.group(2).split('{')[0]} <- {m.group(3)[:90]}"
    return out


def profile(step, hlo_text: str, steps: int) -> tuple[dict, dict]:
    """Per-kind and per-kernel CPU milliseconds per step of `steps` traced calls of `step`."""
    import jax
    kinds = kernel_kinds(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.json.gz", recursive=True))[-1]))
    per_kind, per_kernel = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("name") in kinds:
            ms = e["dur"] / 1e3 / steps
            per_kind[kinds[e["name"]]] += ms
            per_kernel[e["name"]] += ms
    return per_kind, {k: (v, kinds[k]) for k, v in per_kernel.items()}


_TORCH_KINDS = {"matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_mkl", "mkldnn"),
                "reduction": ("sum", "mean", "norm", "_softmax", "native_layer_norm", "layer_norm", "max"),
                "transpose/copy": ("copy_", "clone", "contiguous", "transpose", "permute", "_unsafe_view", "reshape"),
                "optimizer": ("_foreach", "adamw", "lerp", "addcdiv", "addcmul")}


def torch_profile(step, steps: int) -> tuple[dict, dict]:
    """Per-kind and per-operator self-CPU milliseconds per step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_prof
    with torch_prof(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_kind, per_op = collections.Counter(), {}
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / steps
        if ms <= 0 or not ev.key.startswith("aten::"):
            continue
        op = ev.key[len("aten::"):]
        kind = next((k for k, names in _TORCH_KINDS.items() if any(n in op for n in names)), "elementwise")
        per_kind[kind] += ms
        per_op[ev.key] = (ms, kind)
    return per_kind, per_op


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="crate_alpha", choices=["crate_alpha", "crate", "vit"], help="model family")
    ap.add_argument("--variant", help="size name (default B/16, T/16 for crate)")
    ap.add_argument("--res", type=int, default=224, help="image resolution in pixels")
    ap.add_argument("--batch", type=int, help="batch size (default 8, 16 for crate)")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ap.add_argument("--remat", default="none", help="config.model.remat of our side (none: no rematerialisation)")
    ap.add_argument("--attention", default="", help="override our model's attention path (fused, explicit)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip of the optimizer (0: none)")
    ap.add_argument("--wd", type=float, default=0.1, help="weight decay of the optimizer (0: none)")
    ap.add_argument("--sides", default="ours",
                    help="comma-separated sides of bench/vs_official.py (ours, official, port, torch)")
    ap.add_argument("--alpha-repo", help="checkout of UCSC-VLAA/CRATE-alpha (side 'official')")
    ap.add_argument("--crate-repo", help="checkout of Ma-Lab-Berkeley/CRATE (side 'torch')")
    ap.add_argument("--steps", type=int, default=2, help="traced steps per side")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per side")
    ap.add_argument("--kind", help="list the top kernels of this kind only (e.g. matmul, transpose/copy)")
    args = ap.parse_args(argv)
    args.variant = args.variant or ("T/16" if args.model == "crate" else "B/16")
    args.batch = args.batch or (16 if args.model == "crate" else 8)
    print(f"{args.model} {args.variant} @ {args.res} px, batch {args.batch}: CPU ms per step by kernel kind "
          f"({args.steps} traced steps)")
    for side in args.sides.split(","):
        step, stats = vs_official.BUILDERS[side](args)
        step()
        if side == "torch":
            shapes = {}
            per_kind, per_kernel = torch_profile(step, args.steps)
        else:
            hlo = stats.pop("hlo")
            shapes = kernel_shapes(hlo)
            per_kind, per_kernel = profile(step, hlo, args.steps)
        total = sum(per_kind.values())
        print(f"{side}: {total:.0f} ms of kernels per step; "
              + ", ".join(f"{k} {v:.0f}" for k, v in per_kind.most_common()))
        listed = [kv for kv in per_kernel.items() if args.kind in (None, kv[1][1])]
        for name, (ms, kind) in sorted(listed, key=lambda kv: -kv[1][0])[:args.top]:
            print(f"    {ms:8.1f} ms  {kind:<16} {name}  {shapes.get(name, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
