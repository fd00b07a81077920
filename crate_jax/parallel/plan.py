"""Choosing a recipe's layout for a TPU slice by compiling it: the candidates, and how they are ranked.

`python -m crate_jax.aot --plan` compiles each candidate `Layout` (how the chips split into data / fsdp /
tensor axes, the remat policy, the microbatch count) for the target slice, drops those that do not fit in
HBM and ranks the rest by their roofline bound (`crate_jax.parallel.hlo_cost.Roofline`: max of compute,
HBM and interconnect time per chip). This module knows nothing about compiling: `search` takes a
`compile_one(layout) -> Measured` callback (the CLI's libtpu or simulated-CPU compile).

The search is greedy per mesh split, cheapest recompute first: for each split it compiles remat 'none',
and only when that does not fit 'dots', then 'full', then more microbatches; then the best split with the
remats it has not tried (a memory-bound step can be faster recomputing than saving), and the splits whose
first bound was within `CLOSE` of the best's at the remat that won (the order of the splits can change with
the remat: the language model's data × tensor split overtakes the FSDP one at remat full). A split whose global
batch does not divide over its data-parallel chips is not a candidate. So a plan is a handful of compiles,
not the product of every option.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

REMAT_ORDER = ("none", "dots", "full")
CLOSE = 1.5  # a split within this factor of the best one's first-round bound is also compiled at the winning remat


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run a recipe on a slice."""

    data: int
    fsdp: int
    tensor: int = 1
    remat: str = "none"
    microbatches: int = 1

    @property
    def name(self) -> str:
        mesh = "×".join(f"{k} {v}" for k, v in (("data", self.data), ("fsdp", self.fsdp), ("tensor", self.tensor))
                        if v > 1) or "1 chip"
        return mesh + f", remat {self.remat}" + (f", {self.microbatches} microbatches" if self.microbatches > 1 else "")

    def overrides(self, remat_keys: Iterable[str]) -> dict[str, object]:
        """Config keys → values that select this layout (`remat_keys`: every `remat` key of the config's model)."""
        out: dict[str, object] = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor,
                                  "microbatches": self.microbatches}
        out.update({k: self.remat for k in remat_keys})
        return out


@dataclasses.dataclass
class Measured:
    """What one compile of a layout gave (per chip), or why it gave nothing."""

    layout: Layout
    total_bytes: float | None = None  # live HBM per chip (arguments + outputs − aliased + temporaries + code)
    hbm_bytes: float = 0.0
    bound_s: float | None = None  # roofline bound of one step
    binding: str = ""  # the term that binds: compute / memory / communication
    mfu: float | None = None  # analytic model FLOPs / (peak × bound)
    compile_s: float = 0.0
    error: str | None = None  # the compiler's out-of-memory message, or another reason it was dropped

    @property
    def fits(self) -> bool:
        return self.error is None and self.total_bytes is not None and self.total_bytes <= self.hbm_bytes


def splits(chips: int, global_batch: int, *, tensors: Iterable[int] = (1,), hybrids: Iterable[int] = (8,),
           width: int | None = None) -> list[Layout]:
    """The mesh splits worth compiling: pure data parallel, pure FSDP, and data × fsdp for each fsdp size in
    `hybrids` that divides the chips (8 by default: FSDP within a group of 8 chips, data parallel across);
    times each tensor width that divides the chips (and the model width). A split is kept only when the
    global batch divides over its data × fsdp chips."""
    out = []
    for t in sorted(set(tensors)):
        if t < 1 or chips % t or (width is not None and width % t):
            continue
        n = chips // t
        fsdps = {1, n} | {f for f in hybrids if 1 < f < n and n % f == 0}
        for f in sorted(fsdps):
            if global_batch % n == 0:
                out.append(Layout(data=n // f, fsdp=f, tensor=t))
    return out


def search(compile_one: Callable[[Layout], Measured], split_list: Iterable[Layout], *,
           remats: Iterable[str] = REMAT_ORDER, microbatches: Iterable[int] = (2, 4),
           global_batch: int | None = None, log: Callable[[str], None] = lambda s: None) -> list[Measured]:
    """Compiles each split with the cheapest remat that fits (then more microbatches at the last remat); then,
    for the best split, the remats not yet compiled: recomputing can be faster than saving when the step is
    memory-bound (remat 'none' saves every activation for the backward pass and reads it back); then the
    splits within `CLOSE` of the best at the first round, at the winning remat and microbatches. Returns
    every compile's result, ranked (`rank`)."""
    remats = [r for r in REMAT_ORDER if r in set(remats)]
    results = []
    for base in split_list:
        tries = [dataclasses.replace(base, remat=r) for r in remats]
        dp = base.data * base.fsdp
        tries += [dataclasses.replace(base, remat=remats[-1], microbatches=m) for m in microbatches
                  if global_batch is None or (global_batch // dp) % m == 0]
        for layout in tries:
            m = compile_one(layout)
            results.append(m)
            log(line(m))
            if m.fits:
                break
    first = [m for m in rank(results) if m.fits]
    if first:
        done = {m.layout for m in results}

        def more(layout):
            if layout not in done:
                done.add(layout)
                m = compile_one(layout)
                results.append(m)
                log(line(m))
        for r in remats:
            more(dataclasses.replace(first[0].layout, remat=r))
        winner = next(m for m in rank(results) if m.fits).layout
        for m in first[1:]:  # the splits close to the best at the first round, at the remat that won
            if m.bound_s is not None and m.bound_s <= CLOSE * first[0].bound_s:
                more(dataclasses.replace(m.layout, remat=winner.remat, microbatches=winner.microbatches))
    return rank(results)


def rank_key(fits: bool, bound_s: float | None, total_bytes: int | None) -> tuple:
    """Fitting layouts first, fastest bound first; then the rest by how far over HBM they are."""
    return not fits, bound_s if fits and bound_s is not None else math.inf, total_bytes or math.inf


def rank(results: list[Measured]) -> list[Measured]:
    """`results` in `rank_key` order (also the order of a plan's JSON rows)."""
    return sorted(results, key=lambda m: rank_key(m.fits, m.bound_s, m.total_bytes))


def line(m: Measured) -> str:
    mem = "?" if m.total_bytes is None else f"{m.total_bytes / 2**30:.1f}"
    if not m.fits:
        why = m.error or f"needs {mem} GiB of {m.hbm_bytes / 2**30:.0f}"
        return f"{m.layout.name}: does not fit ({why.splitlines()[0][:120]}; compiled in {m.compile_s:.0f}s)"
    mfu = "" if m.mfu is None else f", MFU at the bound {100 * m.mfu:.0f}%"
    return (f"{m.layout.name}: {mem} of {m.hbm_bytes / 2**30:.0f} GiB, step >= {1e3 * m.bound_s:.1f} ms "
            f"({m.binding}-bound{mfu}; compiled in {m.compile_s:.0f}s)")


def table(results: list[Measured]) -> str:
    """The ranked plan as a markdown table."""
    rows = ["| rank | layout | per-chip HBM GiB | step bound ms | binds | MFU at bound | fits |",
            "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(rank(results), 1):
        mem = "?" if m.total_bytes is None else f"{m.total_bytes / 2**30:.1f} / {m.hbm_bytes / 2**30:.0f}"
        bound = "" if m.bound_s is None or not m.fits else f"{1e3 * m.bound_s:.1f}"
        mfu = "" if m.mfu is None or not m.fits else f"{100 * m.mfu:.0f} %"
        rows.append(f"| {i if m.fits else ''} | {m.layout.name} | {mem} | {bound} | {m.binding if m.fits else ''} | "
                    f"{mfu} | {'yes' if m.fits else 'no'} |")
    return "\n".join(rows)


def smallest(compile_at: Callable[[int, Layout], Measured], sizes: Iterable[int], *, global_batch: int,
             start: int | None = None, microbatches: Iterable[int] = (2, 4, 8, 16, 32),
             log: Callable[[str], None] = lambda s: None) -> tuple[Measured | None, list[Measured]]:
    """The smallest slice (a chip count from `sizes`) on which the recipe fits at all: its lowest-memory
    layout, pure FSDP over every chip with remat 'full', and the fewest microbatches that fit.

    Walks from `start` (e.g. predicted from a larger slice's compile: under pure FSDP a chip's bytes shrink
    about as 1/chips) down while the layout fits and up while it does not, so a good start costs two
    compiles; without one it starts in the middle. Assumes that a layout fitting on n chips fits on more.
    Sizes over which the global batch does not divide are skipped (a `start` among them moves up). Returns (the smallest fit or None,
    every compile's result)."""
    ok = sorted(n for n in set(sizes) if n > 0 and global_batch % n == 0)
    results: list[Measured] = []
    if not ok:
        return None, results
    mbs = sorted(set(microbatches))

    def fit_at(n: int) -> Measured:
        m = compile_at(n, Layout(data=1, fsdp=n, remat="full"))
        results.append(m)
        log(line(m))
        if m.fits or m.total_bytes is None:
            return m
        # Microbatches shrink the activations, not the sharded state: try the first count that could make up
        # the excess, then the next.
        need = m.total_bytes / m.hbm_bytes
        tries = [k for k in mbs if (global_batch // n) % k == 0 and k >= need][:2]
        for k in tries:
            m = compile_at(n, Layout(data=1, fsdp=n, remat="full", microbatches=k))
            results.append(m)
            log(line(m))
            if m.fits:
                break
        return m

    if start is None:
        i = (len(ok) - 1) // 2
    else:  # the first size the batch divides over from `start` up (else the largest)
        i = next((j for j, n in enumerate(ok) if n >= start), len(ok) - 1)
    seen: dict[int, Measured] = {}
    best = None
    while 0 <= i < len(ok) and i not in seen:
        m = seen[i] = fit_at(ok[i])
        if m.fits:
            best = m
            if i == 0 or (i - 1 in seen and not seen[i - 1].fits):
                break
            i -= 1
        else:
            if i + 1 in seen and seen[i + 1].fits:
                break
            i += 1
    return best, results


def predicted_start(total_bytes: float, chips: int, hbm_bytes: float, sizes: Iterable[int],
                    headroom: float = 0.9) -> int:
    """The smallest of `sizes` on which `total_bytes` per chip measured on `chips` chips would, scaled as
    1/chips, use at most `headroom` of HBM (the largest size when none would)."""
    ok = sorted(set(sizes))
    return next((n for n in ok if total_bytes * chips / n <= headroom * hbm_bytes), ok[-1])
