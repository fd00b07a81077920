"""Fit before you pay: compile the real train step for a TPU slice on a machine without one.

    python -m crate_jax.aot --config configs/FILE.py:ARGS [--config.KEY=VALUE ...] --topology v5p-128
    python -m crate_jax.aot --config configs/FILE.py:ARGS --topology v5p-128 --simulate
    python -m crate_jax.aot --config configs/FILE.py:ARGS --topology v5p-128 --breakdown
    python -m crate_jax.aot --config configs/FILE.py:ARGS --topology v5p-128 --plan       # rank the layouts
    python -m crate_jax.aot --config configs/FILE.py:ARGS --topology v5p-128 --smallest   # fewest chips

With `libtpu` installed (the `aot` extra), `jax.experimental.topologies.get_topology_desc` describes
the slice's chips; the config's mesh is laid over them and `Setup(config, mesh).compile()` runs the
TPU compiler offline. The report gives per-chip memory (arguments, outputs, temporaries) against the
chip's HBM and the FLOPs per step. `--simulate` compiles the same sharded step for a CPU mesh of the
same number of devices instead: a CPU-compiled *estimate* (different fusion, layouts and precision
handling), for machines without libtpu. `--breakdown` adds where the step's bytes, FLOPs and collectives
go, op by op and source line by source line (`crate_jax.parallel.hlo_cost`), and a roofline bound with a
communication term (max of compute, memory and interconnect time, naming the one that binds).

Nothing touches training data: the class count comes from `config.model.num_classes` when the config
sets it (or from `--num-classes N`), and a config without `total_steps` is compiled with
`total_steps=1` (the schedule length changes constants in the step, not its shapes, memory or FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import time

from crate_jax import errors
# Slice names (v5p-128, v5e-16, v5p:4x4x8, ...) are parsed by the one parser the launcher uses too.
from crate_jax.parallel.tpu_slices import SliceError, TpuSlice, parse as parse_topology


@contextlib.contextmanager
def _libtpu_offline_env(target: TpuSlice):
    """Environment for libtpu's one-time initialisation on a machine without a TPU (restored afterwards):
    don't wait for the lock of another process that loaded libtpu, don't ask a GCE metadata server about
    the slice, and name this host, so libtpu neither stalls nor floods stderr."""
    values = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_ACCELERATOR_TYPE": target.accelerator_type}
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def tpu_devices(target: TpuSlice) -> list:
    """Compile-only devices of the slice (one per chip), from libtpu; no TPU or network needed."""
    try:
        from jax.experimental import topologies
        with _libtpu_offline_env(target):
            topo = topologies.get_topology_desc(
                topology_name=target.topology, platform="tpu",
                chip_config_name="megacore" if target.counts_cores else "default",
                chips_per_host_bounds=target.host_bounds, num_slices=1)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise RuntimeError(f"compiling for {target.name} needs libtpu (pip install 'crate_jax[aot]', i.e. "
                               f"libtpu==0.0.42.*), or pass --simulate for a CPU-compiled estimate ({e})") from e
        raise
    devices = list(topo.devices)
    if len(devices) != target.chips:
        raise RuntimeError(f"libtpu described {target.topology} with {len(devices)} devices, expected "
                           f"{target.chips} (one per chip)")
    return devices


def simulated_devices(n: int) -> list:
    """The first `n` CPU devices; `main` sets `--xla_force_host_platform_device_count` so there are enough."""
    import jax
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(f"--simulate needs {n} CPU devices but jax has {len(devices)}; set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts "
                           f"(python -m crate_jax.aot does this itself)")
    return devices[:n]


def offline_config(config):
    """A copy that Setup can build without data: `total_steps` set (1 when the config counts epochs)."""
    config = copy.deepcopy(config)
    if not config.get("total_steps"):
        with config.unlocked():
            config.total_steps = 1
    return config


@dataclasses.dataclass
class AotReport:
    """Per-device memory (bytes) and FLOPs of one compiled train step.

    `flops_per_device` is XLA's `cost_analysis()` of the partitioned program (one device's share);
    `analytic_flops` is `train_flops(model) × global batch` for the whole step (3 × forward, matmuls and
    attention only), or None when the task does not report it.
    """

    target: str
    backend: str  # e.g. "TPU v5p (libtpu)" or "CPU-compiled estimate"
    estimate: bool
    devices: int
    mesh: dict
    global_batch: int
    arguments: int
    outputs: int | None  # None: unknown (the compiler stopped: out of memory)
    aliased: int | None
    temporaries: int | None
    code: int | None
    hbm_bytes: int
    flops_per_device: float | None
    analytic_flops: float | None
    compile_s: float
    compiler_error: str | None = None  # the TPU compiler's out-of-memory message
    breakdown: str | None = None  # hlo_cost's per-op / per-source text, with --breakdown
    loops: tuple[str, ...] = ()  # loops in the step (e.g. "microbatches=4"), which XLA's cost analysis counts once
    roofline: object | None = None  # hlo_cost.Roofline of the compiled step (with a chip generation to bound on)

    @property
    def total(self) -> int:
        """Live bytes per device: arguments + outputs not aliased to (donated) arguments + temporaries + code
        (the known parts, when the compiler ran out of memory)."""
        known = lambda v: v or 0  # noqa: E731
        return self.arguments + known(self.outputs) - known(self.aliased) + known(self.temporaries) + known(self.code)

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.total <= self.hbm_bytes

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "DOES NOT FIT"
        return "fits (tight: under 10% headroom)" if self.total > 0.9 * self.hbm_bytes else "fits"

    def text(self) -> str:
        gib = _bytes
        label = " (CPU-compiled estimate: XLA:CPU fuses and lays out differently from the TPU compiler)" \
            if self.estimate else ""
        head = (f"{self.target}: {self.devices} chips, mesh {self.mesh}, global batch {self.global_batch}; "
                f"{self.backend}, compiler ran {self.compile_s:.1f}s{label}")
        if self.compiler_error is not None:
            temps = "unknown" if self.temporaries is None else gib(self.temporaries)
            return "\n".join([
                head, f"DOES NOT FIT: {self.compiler_error}",
                f"per-chip memory: arguments {gib(self.arguments)} (sharded state + batch), temporaries {temps}, "
                f"HBM {gib(self.hbm_bytes)}; shard more (config.mesh.fsdp), raise config.microbatches, or use "
                f"config.model.remat / a bfloat16 config.model.dtype"])
        lines = [head,
                 f"per-chip memory: arguments {gib(self.arguments)}, outputs {gib(self.outputs)} "
                 f"({gib(self.aliased)} aliased to donated arguments), temporaries {gib(self.temporaries)}, "
                 f"code {gib(self.code)}",
                 f"per-chip total {gib(self.total)} of {gib(self.hbm_bytes)} HBM "
                 f"({100 * self.total / self.hbm_bytes:.1f}%): {self.verdict}"]
        if self.flops_per_device is not None:
            lines.append(f"FLOPs per step (XLA cost analysis): {_flop(self.flops_per_device)} per chip, "
                         f"{_flop(self.flops_per_device * self.devices)} over the slice"
                         + (f" -- an undercount: XLA counts a loop body once, and this step loops "
                            f"({', '.join(self.loops)})" if self.loops else ""))
        if self.analytic_flops is not None:
            lines.append(f"FLOPs per step (analytic, 3 x forward matmuls + attention): "
                         f"{_flop(self.analytic_flops / self.devices)} per chip, {_flop(self.analytic_flops)} over "
                         f"the slice")
        if self.breakdown:
            lines.append(self.breakdown)
        return "\n".join(lines)


# "... the total memory required for HLO temporaries (23.96G) exceeds available HBM (15.75G)."
_OOM_TEMPS_RE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _flop(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n / 1e6:.3f} MFLOP"


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def breakdown_text(compiled, generation: str | None) -> str:
    """The per-op breakdown of a compiled step, with XLA's own totals beside the model's and, for a TPU
    generation, the roofline bound with its communication term."""
    from crate_jax.parallel import hlo_cost
    b = hlo_cost.Breakdown.of(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = (f"XLA cost analysis: {float(cost.get('bytes accessed', 0)) / 1e9:.3f} GB, "
           f"{float(cost.get('flops', 0)) / 1e12:.3f} TFLOP per chip" if cost else "XLA cost analysis: none")
    lines = [f"breakdown (model: operands + result of each top-level op; {xla})", b.text()]
    if generation in hlo_cost.CHIPS:
        lines.append(hlo_cost.Roofline(b.flops, b.bytes, b.wire_bytes, generation).text())
    return "\n".join(lines)


def compile_report(config, devices, *, target: str, backend: str, estimate: bool, hbm_bytes: int,
                   breakdown: bool = False, generation: str | None = None, roofline: str | None = None) -> AotReport:
    """Builds the mesh from `config.mesh` over `devices`, compiles `Setup(config, mesh)`'s train step and
    measures it. `config` must already be data-free (see `offline_config`). `roofline`: a chip generation to
    bound the step on (`AotReport.roofline`, from the compiled program's per-op costs, loops counted)."""
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.setup import Setup

    sizes = {k: v for k, v in dict(config.mesh).items() if k != "num_devices"}
    mesh = make_mesh(sizes, devices=devices)
    from crate_jax.models import ConfigError
    from crate_jax.parallel.mesh import MeshError
    from crate_jax.classify.task import ClassCountUnavailable
    try:
        setup = Setup(config, mesh)  # the task takes the class count from config.model.num_classes
    except ClassCountUnavailable as e:
        raise errors.UsageError(f"{e}. The only thing the AOT compile needs from the data is the class count: "
                                f"pass --num-classes N or set config.model.num_classes") from e
    except (ConfigError, MeshError):
        raise
    except Exception as e:
        if "model" in config and "num_classes" in config.model and config.model.num_classes is None:
            raise errors.UsageError(
                f"building the train step read the dataset (config.data = {dict(config.data)}) and failed: "
                f"{type(e).__name__}: {e}. The only thing it needs from the data is the class count: pass "
                f"--num-classes N or set config.model.num_classes") from e
        raise  # a bad input the task names (a vocab file, a path): errors.classify reports it
    task = setup.task
    analytic = float(task.flops_per_example()) * setup.global_batch_size
    loops = tuple(name for name, on in (
        (f"microbatches={config.get('microbatches', 1)}", config.get("microbatches", 1) > 1),
        ("model.scan over layers", "model" in config and config.model.get("scan", False))) if on)
    common = dict(target=target, backend=backend, estimate=estimate, devices=len(devices), mesh=dict(mesh.shape),
                  global_batch=setup.global_batch_size, hbm_bytes=hbm_bytes, analytic_flops=analytic, loops=loops)
    t0 = time.perf_counter()
    try:
        compiled = setup.compile()
    except Exception as e:  # noqa: BLE001 - jax.errors.JaxRuntimeError; only out-of-memory is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0]
        m = _OOM_TEMPS_RE.search(message)
        arguments = _shard_bytes(setup.abstract_state) + _shard_bytes(setup.batch_shapes)
        return AotReport(**common, arguments=arguments, outputs=None, aliased=None, code=None, flops_per_device=None,
                         temporaries=int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None,
                         compile_s=time.perf_counter() - t0, compiler_error=message)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"the {backend} compiler reported no memory analysis")
    return AotReport(**common, arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                     aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                     code=mem.generated_code_size_in_bytes, flops_per_device=_flops(compiled), compile_s=compile_s,
                     breakdown=breakdown_text(compiled, generation) if breakdown else None,
                     roofline=_roofline(compiled, roofline) if roofline else None)


def _roofline(compiled, generation: str):
    from crate_jax.parallel import hlo_cost
    b = hlo_cost.Breakdown.of(compiled)
    return hlo_cost.Roofline(b.flops, b.bytes, b.wire_bytes, generation)


def _remat_keys(node, prefix: str = "model") -> list[str]:
    """Every `remat` key of the config's model (a two-tower config has one per tower); `model.remat` when the
    model section names none (the block option's default)."""
    keys = []
    for k in list(node.keys()):
        if k == "remat":
            keys.append(f"{prefix}.remat")
        elif hasattr(node[k], "keys"):
            keys += _remat_keys(node[k], f"{prefix}.{k}")
    return keys or ([f"{prefix}.remat"] if prefix == "model" else [])


def _layout_compiler(config, *, simulate: bool):
    """`compile_one(target, layout) -> plan.Measured`: `config` compiled for the slice `target` with `layout`'s
    mesh, remat and microbatches (libtpu, or a simulated CPU mesh of as many devices)."""
    from crate_jax.errors import ConfigError
    from crate_jax.parallel import hlo_cost, plan as P
    from crate_jax.parallel.mesh import MeshError
    config = offline_config(config)
    remat_keys = _remat_keys(config.model)

    def compile_one(target: TpuSlice, layout):
        devices = simulated_devices(target.chips) if simulate else tpu_devices(target)
        backend = (f"simulated {target.chips}-device CPU mesh" if simulate
                   else f"TPU {target.generation} {target.topology} (libtpu, compile-only)")
        c = copy.deepcopy(config)
        with c.unlocked():
            for key, value in layout.overrides(remat_keys).items():
                node = c
                parts = key.split(".")
                for part in parts[:-1]:
                    node = node[part]
                node[parts[-1]] = value
        try:
            r = compile_report(c, devices, target=target.name, backend=backend, estimate=simulate,
                               hbm_bytes=target.hbm_bytes, roofline=target.generation)
        except (ConfigError, MeshError) as e:
            return P.Measured(layout, hbm_bytes=target.hbm_bytes, error=f"config: {e}")
        m = P.Measured(layout, total_bytes=r.total, hbm_bytes=r.hbm_bytes, compile_s=r.compile_s,
                       error=r.compiler_error)
        if r.roofline is not None:
            m.bound_s, m.binding = r.roofline.bound_s, r.roofline.binding
            if r.analytic_flops:
                m.mfu = r.analytic_flops / len(devices) / hlo_cost.CHIPS[target.generation][0] / m.bound_s
        return m

    return compile_one


def plan(config, topology: str, *, simulate: bool = False, tensors=(1,), hybrids=(8,), remats=None, log=print) -> list:
    """`--plan`: compiles the candidate layouts of `config` for the slice (`crate_jax.parallel.plan`) and returns
    their `Measured`, ranked: fitting first, fastest roofline bound first. A config error that two mesh splits
    share is the config's, not a layout's: raised (ConfigError)."""
    from crate_jax.errors import ConfigError
    from crate_jax.parallel import plan as P
    target = parse_topology(topology)
    compile_one = _layout_compiler(config, simulate=simulate)
    backend = f"simulated {target.chips}-device CPU mesh" if simulate else "libtpu, compile-only"
    log(f"plan for {target.name} ({target.chips} chips, {backend}), global batch {config.batch_size}: "
        f"compiling each mesh split with the cheapest remat that fits")
    splits = P.splits(target.chips, int(config.batch_size), tensors=tensors, hybrids=hybrids)
    config_errors: dict[str, set] = {}

    def compile_checked(layout):
        m = compile_one(target, layout)
        if m.error and m.error.startswith("config: "):  # the same error on two mesh splits: not the layout's
            seen = config_errors.setdefault(m.error, set())
            seen.add((layout.data, layout.fsdp, layout.tensor))
            if len(seen) > 1 or len(splits) == 1:
                raise ConfigError(m.error[len("config: "):])
        return m

    return P.search(compile_checked, splits, remats=remats or P.REMAT_ORDER, global_batch=int(config.batch_size),
                    log=log)


def smallest_slice(config, topology: str, *, simulate: bool = False, start: str | None = None, log=print):
    """`--smallest`: the smallest slice of `topology`'s generation, up to `topology` itself, on which `config`
    fits with its lowest-memory layout (`crate_jax.parallel.plan.smallest`), walking from the slice `start`.
    Returns (the fitting slice or None, its `Measured` or None, every compile's (slice, Measured))."""
    from crate_jax.errors import ConfigError
    from crate_jax.parallel import plan as P
    from crate_jax.parallel.tpu_slices import smaller_slices
    target = parse_topology(topology)
    by_chips = {s.chips: s for s in smaller_slices(target)}
    by_chips.setdefault(target.chips, target)  # a slice of a size off the standard list (v5p-24) is tried too
    first = None
    if start is not None:
        first = parse_topology(start)
        if first.generation != target.generation or first.chips not in by_chips:
            raise errors.UsageError(f"--smallest-start {start}: expected a {target.generation} slice of at most "
                                    f"{target.chips} chips ({', '.join(s.name for s in by_chips.values())})")
    compile_one = _layout_compiler(config, simulate=simulate)
    tried = []

    def compile_at(chips, layout):
        m = compile_one(by_chips[chips], layout)
        if m.error and m.error.startswith("config: "):  # not a question of size: say so once
            raise ConfigError(m.error[len("config: "):])
        tried.append((by_chips[chips], m))
        return m

    log(f"smallest {target.generation} slice for global batch {config.batch_size}: pure FSDP, remat full, "
        f"microbatches when needed")
    best, _ = P.smallest(compile_at, sorted(by_chips), global_batch=int(config.batch_size),
                         start=first.chips if first else None,
                         log=lambda s: log(f"{tried[-1][0].name}: {s}"))
    found = next((sl for sl, m in tried if m is best), None) if best is not None else None
    return found, best, tried


def aot_report(config, topology: str, *, simulate: bool = False, breakdown: bool = False) -> AotReport:
    """Compiles `config`'s train step for the TPU slice `topology` (libtpu), or with `simulate=True` for a CPU
    mesh of as many devices (an estimate, compared against the same chip's HBM)."""
    target = parse_topology(topology)
    config = offline_config(config)
    if simulate:
        devices = simulated_devices(target.chips)
        backend = f"simulated {target.chips}-device CPU mesh"
    else:
        devices = tpu_devices(target)
        backend = f"TPU {target.generation} {target.topology} (libtpu, compile-only)"
    return compile_report(config, devices, target=f"{target.name} ({target.topology})", backend=backend,
                          estimate=simulate, hbm_bytes=target.hbm_bytes, breakdown=breakdown,
                          generation=None if simulate else target.generation)


def _slice_name(text: str) -> str:
    """`--topology`'s check: a slice name `parse_topology` knows (else argparse's usage error, exit 2)."""
    try:
        parse_topology(text)
    except SliceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    from crate_jax.cli import tool_parser
    from crate_jax.train import config_cli
    p = tool_parser("crate_jax.aot", __doc__, allow_abbrev=False)
    config_cli.add_config_arguments(p)
    p.add_argument("--topology", required=True, type=_slice_name, metavar="SLICE",
                   help="the TPU slice to compile for: v5p-128, v5e-16, v6e-64, v4-8, ... or a libtpu topology "
                        "such as v5p:4x4x8")
    p.add_argument("--simulate", action="store_true",
                   help="compile for a CPU mesh of as many devices instead (an estimate; no libtpu needed)")
    p.add_argument("--breakdown", action="store_true",
                   help="also print where the step's bytes, FLOPs and collectives go, and its roofline bound")
    p.add_argument("--plan", action="store_true",
                   help="compile the candidate layouts (data / fsdp / tensor splits, remat, microbatches) for the "
                        "slice, drop those that do not fit and rank the rest by their roofline bound")
    p.add_argument("--plan-tensor", default="1", metavar="T[,T...]",
                   help="with --plan: tensor-parallel widths to try (default 1)")
    p.add_argument("--plan-fsdp", default="8", metavar="F[,F...]",
                   help="with --plan: the FSDP group sizes of the data x fsdp splits tried besides pure data "
                        "parallelism and pure FSDP (default 8)")
    p.add_argument("--plan-remat", default="none,dots,full", metavar="R[,R...]",
                   help="with --plan: the remat policies to consider, cheapest recompute first (default all three)")
    p.add_argument("--plan-json", metavar="FILE",
                   help="with --plan or --smallest: also write the result (every compile) as JSON")
    p.add_argument("--smallest", action="store_true",
                   help="find the smallest slice of --topology's generation, up to --topology, on which the step "
                        "fits at all (pure FSDP, remat full, microbatches when needed)")
    p.add_argument("--smallest-start", type=_slice_name, metavar="SLICE",
                   help="with --smallest: the slice to try first (e.g. predicted from a plan's memory); default: "
                        "the middle size")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="the class count, for a config without config.model.num_classes (no data is read)")
    return p


def main(argv=None) -> int:
    from crate_jax.train import config_cli
    args, overrides = config_cli.parse_args(_parser(), list(sys.argv[1:] if argv is None else argv))
    target = parse_topology(args.topology)
    # Before jax starts: the CPU device count for --simulate, and no attempt to open a TPU either way.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.simulate:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target.chips}".strip()

    from crate_jax.models import ConfigError
    from crate_jax.parallel.mesh import MeshError
    try:
        config = config_cli.config_from_args(args, overrides)
        if args.num_classes is not None:
            config_cli.set_value(config, "model.num_classes", str(args.num_classes))
        if args.plan and args.smallest:
            raise errors.UsageError("--plan and --smallest: pick one (run them as two commands)")
        if args.plan:
            return _print_plan(config, args)
        if args.smallest:
            return _print_smallest(config, args)
        report = aot_report(config, args.topology, simulate=args.simulate, breakdown=args.breakdown)
    except (ConfigError, MeshError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(report.text(), flush=True)
    return 0 if report.fits else 1


def _print_plan(config, args) -> int:
    from crate_jax.parallel import plan as P
    tensors = [int(t) for t in args.plan_tensor.split(",") if t.strip()]
    hybrids = [int(f) for f in args.plan_fsdp.split(",") if f.strip()]
    remats = [r.strip() for r in args.plan_remat.split(",") if r.strip()]
    unknown = sorted(set(remats) - set(P.REMAT_ORDER))
    if unknown or not remats:
        raise errors.UsageError(f"--plan-remat {args.plan_remat!r}: expected some of {', '.join(P.REMAT_ORDER)}")
    results = plan(config, args.topology, simulate=args.simulate, tensors=tensors, hybrids=hybrids, remats=remats,
                   log=lambda s: print("  " + s, flush=True))
    print(P.table(results), flush=True)
    best = next((m for m in results if m.fits), None)
    print(f"best: {best.layout.name}" if best else "no candidate fits: raise the slice size or lower the batch")
    if args.plan_json:
        _write_json(args, plan=[_measured_row(m) for m in results])
    return 0 if best else 1


def _write_json(args, **fields) -> None:
    """`--plan-json`: the slice, the config and `fields`, written atomically."""
    import json
    from crate_jax.checkpoint.outputs import atomic_output_file
    with atomic_output_file(args.plan_json, "w", overwrite=True) as f:
        f.write(json.dumps({"topology": args.topology, "config": args.config, **fields}, indent=1))


def _measured_row(m) -> dict:
    return dict(dataclasses.asdict(m.layout), name=m.layout.name, fits=m.fits, total_bytes=m.total_bytes,
                hbm_bytes=m.hbm_bytes, bound_s=m.bound_s, binding=m.binding, mfu=m.mfu, compile_s=m.compile_s,
                error=m.error)


def _print_smallest(config, args) -> int:
    found, best, tried = smallest_slice(config, args.topology, simulate=args.simulate, start=args.smallest_start,
                                        log=lambda s: print("  " + s, flush=True))
    if found is None:
        print(f"does not fit on any {parse_topology(args.topology).generation} slice up to {args.topology} with its "
              f"lowest-memory layout: lower the batch or use a larger slice")
    else:
        print(f"smallest: {found.accelerator_type} ({found.chips} chips), {best.layout.name}: "
              f"{best.total_bytes / 2**30:.1f} of {best.hbm_bytes / 2**30:.0f} GiB per chip"
              + (f", step >= {1e3 * best.bound_s:.1f} ms ({best.binding}-bound)" if best.bound_s else ""))
    if args.plan_json:
        _write_json(args, smallest=found.accelerator_type if found else None,
                    tried=[dict(_measured_row(m), slice=sl.accelerator_type, chips=sl.chips) for sl, m in tried])
    return 0 if found else 1


if __name__ == "__main__":
    errors.exit_with(main)
