"""Where a compiled step's bytes, FLOPs and collectives go: a breakdown of the optimised HLO text
(`compiled.as_text()`) by op and by source scope.

XLA's `cost_analysis()` gives one number per program. To name the ops behind it, this module reads the
scheduled HLO module that the compiler emitted (TPU via libtpu compile-only, or CPU) and charges each
top-level instruction of the entry computation (and of the bodies of `while` loops, times their trip
count when the compiler records it as `known_trip_count`):

* HBM bytes: the bytes of its operands plus the bytes of its result, the roofline model of XLA's own
  `bytes accessed` (a fusion reads its inputs and writes its output once; what stays inside a fusion is
  on-chip). Tuple plumbing (`tuple`, `get-tuple-element`, `bitcast`, `parameter`, `constant`) and the
  `-done` half of an async pair cost nothing.
* FLOPs: `2 · |output| · |contracted dims|` for every `dot` and `convolution` inside it (the matmuls,
  which are what the MFU counts), and for a TPU kernel's custom call (Pallas flash attention) the
  kernel's own cost estimate or, for its backward kernels, their matmuls (`kernel_cost.flops`); its HBM
  reads include the blocks a flash-attention kernel streams more than once (`kernel_cost.reads`).
* collectives (`all-gather`, `reduce-scatter`, `all-reduce`, `all-to-all`, `collective-permute`, sync or
  async): their bytes (the larger of operand and result) and the size of their replica groups.

Each instruction's source is its `op_name` metadata (the JAX named scopes: layer, block, loss,
optimizer), shortened by `source_of`. The parts add up to the totals `Breakdown` prints, which are
this model's totals; the compiler's own `cost_analysis()` figures are printed beside them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from crate_jax.parallel import kernel_cost

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier"}

_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a result type, possibly a tuple, or an operand list)."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _dims(text: str) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for _, dims in _SHAPE.findall(text)]


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    result: str  # the result type text
    operands: str  # the operand list text (types inline in scheduled HLO)
    attrs: str
    computation: str

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    def called(self) -> list[str]:
        return re.findall(r"(?:calls|body|to_apply|condition)=%?([\w.\-]+)", self.attrs)


def _split_call(rest: str) -> tuple[str, str]:
    """`'a, b), kind=..., calls=...'` -> (`'a, b'`, `'kind=..., calls=...'`): the operand list ends at the
    parenthesis that closes the call."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


@dataclasses.dataclass
class Module:
    """A parsed HLO module: computations, their instructions' result types (for operand sizes: scheduled HLO
    names operands without their types) and the source-location tables."""

    comps: dict[str, list[Instr]]
    entry: str
    types: dict[str, dict[str, str]]  # computation -> value name -> type text
    frames: dict[int, tuple[int, int]]  # stack frame id -> (file location id, parent frame id + 1)
    locations: dict[int, tuple[int, int, int]]  # file location id -> (file id, function id, line)
    files: dict[int, str]
    functions: dict[int, str]

    def operand_types(self, ins: Instr) -> str:
        """The operand list with each `%name` replaced by its type (inline types are kept)."""
        table = self.types.get(ins.computation, {})
        return re.sub(r"%([\w.\-]+)", lambda m: table.get(m.group(1), ""), ins.operands)

    def stack(self, ins: Instr) -> list[tuple[str, int, str]]:
        """`[(file, line, function)]` of the instruction's Python stack, innermost first."""
        m = re.search(r"stack_frame_id=(\d+)", ins.attrs)
        out, fid, seen = [], int(m.group(1)) if m else 0, set()
        while fid in self.frames and fid not in seen:
            seen.add(fid)
            loc, parent = self.frames[fid]
            f, fn, line = self.locations.get(loc, (0, 0, 0))
            out.append((self.files.get(f, "?"), line, self.functions.get(fn, "?")))
            fid = parent - 1
        return out


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def parse(hlo_text: str) -> Module:
    """The computations, entry, value types and source tables of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    types: dict[str, dict[str, str]] = {}
    tables: dict[str, dict[int, str]] = {t: {} for t in _TABLES}
    entry, current, table = "", None, None
    for line in hlo_text.splitlines():
        if line in _TABLES:
            table = line
            continue
        if table is not None:
            m = re.match(r"^(\d+) (.*)$", line)
            if m:
                tables[table][int(m.group(1))] = m.group(2)
                continue
            table = None
        if not line.strip() or line.startswith(("HloModule", "//")):
            continue
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current], types[current] = [], {}
            if line.startswith("ENTRY"):
                entry = current
            sig = line[line.find("(") + 1: line.rfind("->")]
            for pname, ptype in re.findall(r"([\w.\-]+): ((?:\([^)]*\))|[^,()]+(?:\[[^\]]*\])?(?:\{[^}]*\})?)", sig):
                types[current][pname] = ptype
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, opcode, rest = m.groups()
        operands, attrs = _split_call(rest)
        comps[current].append(Instr(name, opcode, result, operands, attrs, current))
        types[current][name] = result
    ints = lambda text: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}  # noqa: E731
    frames = {i: (d["file_location_id"], d["parent_frame_id"]) for i, t in tables["StackFrames"].items()
              for d in [ints(t)] if "file_location_id" in d}
    locations = {i: (d["file_name_id"], d["function_name_id"], d["line"]) for i, t in tables["FileLocations"].items()
                 for d in [ints(t)] if "file_name_id" in d}
    return Module(comps, entry, types, frames, locations,
                  {i: t.strip('"') for i, t in tables["FileNames"].items()},
                  {i: t.strip('"') for i, t in tables["FunctionNames"].items()})


def dot_flops(instr: Instr, operand_types: str | None = None) -> float:
    """`2 · |result| · |contracted|` of a dot (from its lhs shape and `lhs_contracting_dims`), or of a
    convolution (`2 · |result| · |kernel| / output features`)."""
    out = _dims(instr.result)
    ops = _dims(instr.operands if operand_types is None else operand_types)
    if not out or not ops:
        return 0.0
    n_out = math.prod(out[0])
    if instr.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        contract = [int(d) for d in m.group(1).split(",") if d] if m else []
        return 2.0 * n_out * math.prod(ops[0][d] for d in contract)
    if instr.opcode == "convolution" and len(ops) > 1:
        return _conv_flops(instr, out[0], ops[0], ops[1])
    return 0.0


def custom_call_flops(instr: Instr, operand_types: str) -> float:
    """FLOPs of a TPU kernel's custom call (`kernel_cost.flops`)."""
    return kernel_cost.flops(instr.name, instr.attrs, _dims(operand_types))


def _is_kernel(ins: Instr) -> bool:
    """A custom call with no XLA computation inside: an opaque TPU kernel (`custom_call_flops`, `kernel_reads`)."""
    return ins.opcode == "custom-call" and not ins.called()


def kernel_reads(name: str, operands: list[str], forward_block: int = 128) -> int:
    """HBM bytes a TPU kernel reads, from its operands' type texts (`kernel_cost.reads`)."""
    return kernel_cost.reads(name, [shape_bytes(o) for o in operands], [d[0] if (d := _dims(o)) else [] for o in operands],
                             forward_block)


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\d_x]+)", attrs)
    if not m:
        return [default] * n
    return [int(v.split("_")[0]) if key != "pad" else tuple(int(u) for u in v.split("_"))
            for v in m.group(1).split("x")]


def _taps(out: int, size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int, length: int) -> int:
    """(output, window tap) pairs of one spatial dimension that land on a real input element (not padding,
    not a hole of `lhs_dilate`)."""
    dilated = (length - 1) * lhs_dil + 1
    total = 0
    for o in range(out):
        start = o * stride - pad_lo
        if rhs_dil == 1:
            lo, hi = max(start, 0), min(start + size, dilated)  # positions in [lo, hi)
            if hi > lo:
                total += (hi - 1) // lhs_dil - (lo - 1) // lhs_dil if lo > 0 else (hi - 1) // lhs_dil + 1
        else:
            total += sum(1 for k in range(size) if 0 <= start + k * rhs_dil < dilated
                         and (start + k * rhs_dil) % lhs_dil == 0)
    return total


def _conv_flops(instr: Instr, out: list[int], lhs: list[int], rhs: list[int]) -> float:
    """`2 · batch · out features · in features (per group) · Σ real taps`: a convolution's multiply-adds,
    counting only window taps that meet real input (the TPU compiler writes matmuls as convolutions whose
    windows are mostly padding or dilation holes, e.g. a batch dimension as a dilated window)."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    spatial = sorted(c for c in out_l if c.isdigit())
    n = len(spatial)
    sizes = _window(instr.attrs, "size", n, 1)
    strides = _window(instr.attrs, "stride", n, 1)
    pads = _window(instr.attrs, "pad", n, (0, 0))
    lhs_dil = _window(instr.attrs, "lhs_dilate", n, 1)
    rhs_dil = _window(instr.attrs, "rhs_dilate", n, 1)
    taps = 1
    for j, d in enumerate(spatial):
        taps *= _taps(out[out_l.index(d)], sizes[j], strides[j], pads[j][0] if isinstance(pads[j], tuple) else 0,
                      lhs_dil[j], rhs_dil[j], lhs[lhs_l.index(d)])
    groups = re.search(r"batch_group_count=(\d+)", instr.attrs)
    batch = out[out_l.index("b")]
    return 2.0 * batch * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps / 1.0 if not groups else \
        2.0 * batch * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def source_of(stack: list[tuple[str, int, str]], op_name: str = "", depth: int = 2) -> str:
    """A short source label: the innermost `depth` frames of the instruction's Python stack that lie in this
    package (`models/blocks.py:101 CrateAlphaBlock.__call__ < ...`), or, without a stack, its `op_name`;
    `(bwd)` marks the backward pass (a `transpose` in the op name)."""
    ours = [(f, line, fn) for f, line, fn in stack if "crate_jax/" in f and "/site-packages/" not in f]
    lib = next(((f, line, fn) for f, line, fn in stack if "/site-packages/" in f), None)
    if ours:
        parts = [f"{f.split('crate_jax/', 1)[1]}:{line} {fn.split('.<locals>')[0]}" for f, line, fn in ours[:depth]]
        label = " < ".join(parts)
        if lib is not None and stack.index(lib) < stack.index(ours[0]):
            label = f"{lib[0].split('/site-packages/', 1)[1].split('/')[0]} via {label}"
    elif op_name:
        label = "/".join(p for p in op_name.split("/") if p and not p.startswith("jit("))[:80] or "(top level)"
    else:
        label = "(no source)"
    return label + (" (bwd)" if "transpose(" in op_name else "")


@dataclasses.dataclass
class Charge:
    name: str
    opcode: str
    source: str
    bytes: float
    flops: float
    collective: str | None = None
    group: int = 1
    count: float = 1.0
    in_bytes: float = 0.0
    out_bytes: float = 0.0

    def wire_bytes(self) -> float:
        """Bytes each chip sends over the interconnect for a collective (ring algorithms, bandwidth term):
        all-gather `(g-1)/g · result`, reduce-scatter and all-to-all `(g-1)/g · operand`, all-reduce twice
        that, collective-permute the operand."""
        g = max(self.group, 1)
        f = (g - 1) / g
        return {"all-gather": f * self.out_bytes, "reduce-scatter": f * self.in_bytes,
                "all-to-all": f * self.in_bytes, "all-reduce": 2 * f * self.in_bytes,
                "collective-permute": self.in_bytes}.get(self.collective or "", 0.0)


def _trip_count(instr: Instr, mod: "Module | None" = None) -> float:
    """A `while` loop's trip count: the compiler's `known_trip_count`, else read from a condition of the form
    `counter < N` with a constant `N` (how `lax.scan` / `fori_loop` loops from 0 by 1 compile), else 1."""
    m = re.search(r'known_trip_count=\{n=(\d+)\}|"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
    if m:
        return float(next(g for g in m.groups() if g))
    cond = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
    if mod is None or not cond:
        return 1.0
    body = mod.comps.get(cond.group(1), [])
    consts = {i.name: i for i in body if i.opcode == "constant"}
    for ins in body:
        if ins.opcode == "compare" and "direction=LT" in ins.attrs:
            names = re.findall(r"%([\w.\-]+)", ins.operands)
            if len(names) == 2 and names[1] in consts:
                value = re.search(r"constant\((-?\d+)\)", f"{consts[names[1]].opcode}({consts[names[1]].operands})")
                if value and int(value.group(1)) > 0:
                    return float(value.group(1))
    return 1.0


def _group_size(instr: Instr) -> int:
    # mesh['a'=8,'b'=1] {'a'}, or with the device order between: mesh[...], device_ids=([32,8]T(1,0)) {'a'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*\{([^}]*)\}", instr.attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", instr.attrs)  # iota form: [groups, size]<=[...]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", instr.attrs)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", instr.attrs)
    return 2 if m else 1


def _operand_list(mod: "Module", ins: Instr) -> list[str]:
    """Each operand's type text, in order."""
    table = mod.types.get(ins.computation, {})
    parts, depth, cur = [], 0, ""
    for ch in ins.operands:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        m = re.search(r"%([\w.\-]+)\s*$", p.strip())
        out.append(table.get(m.group(1), "") if m and not _SHAPE.search(p) else p)
    return out


def _sliced_read(mod: "Module", uses: list[tuple[Instr, int]], full: int, depth: int = 0) -> int:
    """Bytes a fused computation reads of a parameter with these `(user, operand position)` uses: the sizes of
    its dynamic slices when it is read only through them, directly or as a nested fusion's parameter (how a
    scanned layer reads its slice of the stacked per-layer arrays); else all `full` bytes."""
    total = 0
    for u, pos in uses:
        if u.opcode == "dynamic-slice" and pos == 0:
            total += shape_bytes(u.result)
            continue
        body = mod.comps.get(u.called()[0], []) if u.opcode == "fusion" and u.called() and depth < 4 else []
        inner = next((i.name for i in body if i.opcode == "parameter" and i.operands.strip() == str(pos)), None)
        if inner is None:
            return full
        total += _sliced_read(mod, [(i, p) for i in body for p, n in enumerate(re.findall(r"%([\w.\-]+)",
                                                                                           i.operands)) if n == inner],
                              full, depth + 1)
    return min(full, total) if uses else full


def _io_bytes(mod: "Module", ins: Instr) -> tuple[int, int]:
    """`(bytes read, bytes written)` of a top-level op. In-place updates count their slice, not the whole buffer:
    a `dynamic-update-slice` reads and writes its update, a `dynamic-slice` reads what it returns; inside a
    fusion, a parameter read only through dynamic slices counts their sizes, and a buffer updated in place by
    a root `dynamic-update-slice` counts the update (how a `scan` reads and writes its stacked per-layer
    arrays; XLA's cost analysis counts them so too)."""
    operands = _operand_list(mod, ins)
    if ins.opcode == "dynamic-update-slice" and len(operands) > 1:
        upd = shape_bytes(operands[1])
        return upd + shape_bytes("".join(operands[2:])), upd
    if ins.opcode == "dynamic-slice":
        res = shape_bytes(ins.result)
        return res + shape_bytes("".join(operands[1:])), res
    if ins.opcode == "slice-start":  # async slice: result ((operand), slice, context); it moves only the slice
        shapes = [m.group(0) for m in _SHAPE.finditer(ins.result)]
        piece = shape_bytes(shapes[1]) if len(shapes) > 1 else 0
        return piece, piece
    if ins.opcode != "fusion" or not ins.called():
        return shape_bytes("".join(operands)), shape_bytes(ins.result)
    body = mod.comps.get(ins.called()[0], [])
    params = {i.name: int(re.search(r"parameter\((\d+)\)", f"parameter({i.operands})").group(1))
              for i in body if i.opcode == "parameter"}
    users: dict[str, list[tuple[Instr, int]]] = {n: [] for n in params}
    for i in body:
        for pos, name in enumerate(re.findall(r"%([\w.\-]+)", i.operands)):
            if name in users:
                users[name].append((i, pos))
    root = next((i for i in body if i.attrs is not None and i is body[-1]), None)
    roots = [root] if root is not None else []
    if root is not None and root.opcode == "tuple":
        names = re.findall(r"%([\w.\-]+)", root.operands)
        roots = [i for i in body if i.name in names]
    in_place = {}
    for r in roots:
        if r.opcode == "dynamic-update-slice":
            ops = re.findall(r"%([\w.\-]+)", r.operands)
            table = mod.types.get(r.computation, {})
            if ops and ops[0] in params and len(ops) > 1:
                in_place[ops[0]] = shape_bytes(table.get(ops[1], ""))
    read = 0
    for name, idx in params.items():
        full = shape_bytes(operands[idx]) if idx < len(operands) else 0
        read += in_place[name] if name in in_place else _sliced_read(mod, users[name], full)
    written = shape_bytes(ins.result)
    if in_place:
        written -= sum(shape_bytes(mod.types.get(ins.called()[0], {}).get(n, "")) for n in in_place)
        written += sum(in_place.values())
    return read, max(written, 0)


def charges(hlo_text: str) -> list[Charge]:
    """One `Charge` per costed top-level instruction (entry and loop bodies, scaled by trip counts)."""
    mod = parse(hlo_text)
    flops_of: dict[str, float] = {}

    def comp_flops(name: str, seen=()) -> float:
        if name in flops_of:
            return flops_of[name]
        total = 0.0
        for ins in mod.comps.get(name, []):
            if ins.opcode in ("dot", "convolution"):
                total += dot_flops(ins, mod.operand_types(ins))
            if _is_kernel(ins):
                total += custom_call_flops(ins, mod.operand_types(ins))
            if ins.opcode in ("fusion", "call", "custom-call") and name not in seen:
                total += sum(comp_flops(c, seen + (name,)) for c in ins.called())
        flops_of[name] = total
        return total

    out: list[Charge] = []
    block = kernel_cost.flash_forward_block(i.name for c in mod.comps.values() for i in c if _is_kernel(i))

    def walk(comp: str, scale: float, seen=()):
        for ins in mod.comps.get(comp, []):
            op = ins.opcode
            if op in FREE or op.endswith("-done"):
                continue
            if op in ("while", "call", "conditional"):
                n = _trip_count(ins, mod) if op == "while" else 1.0
                for c in ins.called():
                    if c not in seen:
                        walk(c, scale * n, seen + (comp,))
                continue
            coll = next((c for c in COLLECTIVES if op == c or op == c + "-start"), None)
            in_b, out_b = _io_bytes(mod, ins)
            if _is_kernel(ins):
                in_b = kernel_reads(ins.name, _operand_list(mod, ins), block)
            if op.endswith("-start") and op != "slice-start":  # an async start's result repeats its operands
                out_b = max(out_b - in_b, 0)
            flops = (dot_flops(ins, mod.operand_types(ins)) if op in ("dot", "convolution") else 0.0) + \
                (sum(comp_flops(c) for c in ins.called()) if op in ("fusion", "custom-call") else 0.0) + \
                (custom_call_flops(ins, mod.operand_types(ins)) if _is_kernel(ins) else 0.0)
            out.append(Charge(ins.name, op, source_of(mod.stack(ins), ins.op_name), (in_b + out_b) * scale,
                              flops * scale, collective=coll, group=_group_size(ins) if coll else 1, count=scale,
                              in_bytes=in_b * scale, out_bytes=out_b * scale))
    walk(mod.entry, 1.0)
    return out


@dataclasses.dataclass
class Breakdown:
    charges: list[Charge]

    @classmethod
    def of(cls, compiled_or_text) -> "Breakdown":
        text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
        return cls(charges(text))

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.charges)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.charges)

    @property
    def wire_bytes(self) -> float:
        return sum(c.wire_bytes() for c in self.charges)

    def collectives(self) -> list[Charge]:
        return [c for c in self.charges if c.collective]

    def by(self, key, weight: str = "bytes") -> list[tuple[str, float, int]]:
        """`[(label, total, count)]` sorted by total, with `key(charge) -> label`."""
        agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for c in self.charges:
            a = agg[key(c)]
            a[0] += c.wire_bytes() if weight == "wire" else getattr(c, weight)
            a[1] += 1
        return sorted(((k, v[0], v[1]) for k, v in agg.items()), key=lambda r: -r[1])

    def text(self, top: int = 12) -> str:
        tot_b, tot_f = self.bytes, self.flops
        lines = [f"HBM bytes by op kind (model total {tot_b / 1e9:.3f} GB per chip):"]
        for label, b, n in self.by(lambda c: c.collective or c.opcode)[:top]:
            lines.append(f"  {label:<22} {b / 1e9:10.3f} GB {100 * b / max(tot_b, 1):5.1f}%  ({n} ops)")
        lines.append(f"HBM bytes by source (top {top}):")
        for label, b, n in self.by(lambda c: c.source)[:top]:
            lines.append(f"  {label[:70]:<70} {b / 1e9:9.3f} GB {100 * b / max(tot_b, 1):5.1f}%")
        lines.append(f"matmul FLOPs by source (model total {tot_f / 1e12:.3f} TFLOP per chip, top {top}):")
        for label, f, n in self.by(lambda c: c.source, "flops")[:top]:
            if f:
                lines.append(f"  {label[:70]:<70} {f / 1e12:9.4f} TFLOP {100 * f / max(tot_f, 1):5.1f}%")
        colls = self.collectives()
        lines.append(f"collectives: {len(colls)} ops, {sum(c.bytes for c in colls) / 1e9:.3f} GB of HBM traffic, "
                     f"{self.wire_bytes / 1e9:.3f} GB sent per chip over the interconnect")
        for label, b, n in self.by(lambda c: f"{c.collective} (group {c.group})" if c.collective else "",
                                   "wire")[:top]:
            if label:
                lines.append(f"  {label:<34} {b / 1e9:9.3f} GB on the wire ({n} ops)")
        lines.append("largest collectives by source:")
        for label, b, n in self.by(lambda c: f"{c.collective}: {c.source}" if c.collective else "", "wire")[:top]:
            if label and b:
                lines.append(f"  {label[:100]:<100} {b / 1e9:8.3f} GB ({n})")
        return "\n".join(lines)


# Published per-chip figures (Google Cloud TPU system-architecture pages): dense bf16 FLOP/s, HBM bytes/s and
# inter-chip interconnect (ICI) bytes/s summed over a chip's links (v4 2,400 Gbit/s, v5e 1,600, v5p 4,800, v6e
# 3,584). Multi-slice traffic crosses the data-centre network (DCN) instead: 25 GB/s per host is an assumption
# (a 200 Gbit/s NIC), not a published figure; check your VMs.
CHIPS = {"v4": (275e12, 1228e9, 300e9), "v5e": (197e12, 819e9, 200e9), "v5p": (459e12, 2765e9, 600e9),
         "v6e": (918e12, 1640e9, 448e9)}
DCN_BYTES_PER_S_PER_HOST = 25e9


@dataclasses.dataclass
class Roofline:
    """Lower bounds on one step's time per chip: compute (FLOPs / peak), memory (HBM bytes / bandwidth) and
    communication (bytes each chip puts on the ICI / its per-chip ICI bandwidth, every link busy: ring
    collectives along a torus axis use fewer links, so this term is optimistic). Assumption: the three
    overlap perfectly, so the step takes at least the largest; the output names it."""

    flops: float
    hbm_bytes: float
    wire_bytes: float
    generation: str

    @property
    def times(self) -> dict[str, float]:
        peak, hbm, ici = CHIPS[self.generation]
        return {"compute": self.flops / peak, "memory": self.hbm_bytes / hbm, "communication": self.wire_bytes / ici}

    @property
    def binding(self) -> str:
        return max(self.times.items(), key=lambda kv: kv[1])[0]

    @property
    def bound_s(self) -> float:
        return max(self.times.values())

    def text(self) -> str:
        t = self.times
        return (f"roofline per chip: compute {1e3 * t['compute']:.1f} ms, memory {1e3 * t['memory']:.1f} ms, "
                f"communication {1e3 * t['communication']:.1f} ms (ICI {CHIPS[self.generation][2] / 1e9:.0f} GB/s "
                f"per chip, all links) -> step >= {1e3 * self.bound_s:.1f} ms, {self.binding}-bound (assuming "
                f"the three overlap)")
