"""Cloud TPU slices: the one parser of slice names, for the launcher and for AOT compilation.

`parse(name)` takes an accelerator type (`v5p-128`, `v4-32`, `v5e-16` / `v5litepod-16`, `v6e-64`)
or a libtpu topology string (`v5p:4x4x8`, `v5e:4x4`) and returns a `TpuSlice`: chips, hosts,
torus shape, HBM per chip, runtime image and the names gcloud and libtpu want. `launch/tpu_vm.py`
and `crate_jax.aot` both call it, so a name one accepts the other accepts too.

Standard library only: `launch/tpu_vm.py` imports this file on a laptop without JAX.

Sources (public Google Cloud docs, read 2026-11-22):
  * Runtime ("software") versions for JAX:  https://cloud.google.com/tpu/docs/runtimes
      v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite,
      v4 and older -> tpu-ubuntu2204-base.
  * Accelerator types, shapes and hosts: https://cloud.google.com/tpu/docs/v4,
      https://cloud.google.com/tpu/docs/v5p (`v4-N`, `v5p-N`: N counts TensorCores, 2 per chip, 4
      chips per host VM; published shapes 2x2x1, 2x2x2, 2x4x4, 4x4x4, 4x4x8, ... 16x16x24 for
      v5p-12288, so N is any multiple of 8 up to the largest slice, not only a power of two);
      https://cloud.google.com/tpu/docs/v5e, https://cloud.google.com/tpu/docs/v6e
      (`v5litepod-N`, `v6e-N`: N counts chips, 1 TensorCore each; up to 8 chips is one VM, larger
      slices are 4-chip VMs, e.g. v6e-64 = 8x8 = 16 VMs).
  * HBM per chip (system-architecture pages): v4 32 GiB, v5e 16, v5p 95, v6e 32.
  * Zones: https://cloud.google.com/tpu/docs/regions-zones (they change; `known_zones` is only
      used for a warning, never to refuse a zone).
"""

from __future__ import annotations

import dataclasses
import math
import re

# generation -> (accelerator-type prefix, runtime version, counts TensorCores?, HBM GiB per chip,
#                largest slice in accelerator-type units, torus dimensions)
_GENERATIONS: dict[str, tuple[str, str, bool, int, int, int]] = {
    "v4": ("v4", "tpu-ubuntu2204-base", True, 32, 4096, 3),
    "v5p": ("v5p", "v2-alpha-tpuv5", True, 95, 12288, 3),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", False, 16, 256, 2),
    "v6e": ("v6e", "v2-alpha-tpuv6e", False, 32, 256, 2),
}
_CHIPS_PER_HOST = 4  # multi-host VMs of every generation hold 4 chips
_CHIP_COUNTED_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slice sizes (chips)

KNOWN_ZONES: dict[str, tuple[str, ...]] = {  # regions-zones page, read 2026-11-22 (unambiguous entries only)
    "v4": ("us-central2-b",),
    "v5p": ("us-central1-a", "us-east5-a"),
    "v5e": ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a"),
}

VALID_FORMS = ("v4-N / v5p-N (N = TensorCores = 2 x chips, a multiple of 8, e.g. v4-32, v5p-128, up to v4-4096 / "
               "v5p-12288); v5e-N / v5litepod-N / v6e-N (N = chips: 1, 4, 8, 16, 32, 64, 128, 256, e.g. v5e-16, "
               "v6e-64); or a libtpu topology string GEN:AxB[xC] (e.g. v5p:4x4x4, v5e:4x4)")
_TYPE_RE = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")
_TOPO_RE = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")


class SliceError(ValueError):
    """A name that is not a Cloud TPU slice this project knows; the message lists the valid forms."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One Cloud TPU slice.

    Attributes:
      name: what the user asked for, e.g. "v5p-128" or "v5p:4x4x8".
      generation: "v4", "v5p", "v5e" or "v6e".
      shape: chips per torus dimension, e.g. (4, 4, 4); its product is `chips`.
    """

    name: str
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def counts_cores(self) -> bool:
        return _GENERATIONS[self.generation][2]

    @property
    def accelerator_type(self) -> str:
        """The name gcloud takes, e.g. "v5p-128" (v4 / v5p count TensorCores) or "v5litepod-16"."""
        prefix = _GENERATIONS[self.generation][0]
        return f"{prefix}-{2 * self.chips if self.counts_cores else self.chips}"

    @property
    def topology(self) -> str:
        """The libtpu topology string, e.g. "v5p:4x4x4"."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        """TPU VMs (workers) in the slice: `--worker=all` reaches this many, one JAX process each."""
        if not self.counts_cores and self.chips <= 8:
            return 1
        return max(1, self.chips // _CHIPS_PER_HOST)

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host VM in each dimension (libtpu's `chips_per_host_bounds`)."""
        if not self.counts_cores and self.chips <= 8:
            return (*self.shape, 1)
        return (2, 2, 1)

    @property
    def hbm_bytes(self) -> int:
        return _GENERATIONS[self.generation][3] * 2**30

    @property
    def runtime_version(self) -> str:
        return _GENERATIONS[self.generation][1]

    @property
    def known_zones(self) -> tuple[str, ...]:
        return KNOWN_ZONES[self.generation]

    def describe(self) -> str:
        """One line for printed plans, e.g. 'v5p-128: 64 chips on 16 hosts (4 chips/host) ...'."""
        return (f"{self.accelerator_type}: {self.chips} chips on {self.hosts} host"
                f"{'s' if self.hosts > 1 else ''} ({self.chips_per_host} chips/host), "
                f"runtime {self.runtime_version}, one JAX process per host")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape for `chips`. Powers of two follow the published shapes: start from the smallest
    slice (2x2x1 in 3-D, 1x1 in 2-D) and keep doubling the last of the smallest dimensions (2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; 1x1, 2x2, 2x4, 4x4, ...). Other counts (v4 / v5p slices of
    any multiple of 4 chips) take the most cube-like factorisation, ascending (12 -> 2x2x3, 6144 ->
    16x16x24)."""
    if chips & (chips - 1) == 0:
        shape = [2, 2, 1] if dims == 3 else [1, 1]
        while math.prod(shape) < chips:
            smallest = min(shape)
            i = max(j for j, s in enumerate(shape) if s == smallest)
            shape[i] *= 2
        return tuple(shape)
    best = None
    for a in range(1, round(chips ** (1 / 3)) + 2):
        if chips % a:
            continue
        for b in range(a, int(math.isqrt(chips // a)) + 1):
            if (chips // a) % b:
                continue
            cand = (a, b, chips // a // b)
            if best is None or (cand[2] / cand[0], cand) < (best[2] / best[0], best):
                best = cand
    return best


def parse(name: str) -> TpuSlice:
    """`'v5p-128'` -> TpuSlice(v5p, 4x4x4); also `v4-32`, `v5e-16`, `v5litepod-16`, `v6e-64` and libtpu
    strings such as `'v5p:4x4x8'`. Raises SliceError naming the valid forms."""
    text = str(name).strip().lower()
    raw = _TOPO_RE.match(text)
    if raw:
        gen, dims = raw.group(1), tuple(int(d) for d in raw.group(2).split("x"))
        want = _GENERATIONS[gen][5]
        if len(dims) != want or min(dims) < 1:
            raise SliceError(f"TPU topology {name!r}: {gen} slices are {want}-D "
                             f"({'AxBxC' if want == 3 else 'AxB'}); valid forms: {VALID_FORMS}")
        return TpuSlice(str(name), gen, dims)
    m = _TYPE_RE.match(text)
    if m is None:
        raise SliceError(f"unknown TPU slice {name!r}; valid forms: {VALID_FORMS}")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    prefix, _, counts_cores, _, largest, dims = _GENERATIONS[gen]
    n = int(m.group(2))
    if counts_cores:
        if n < 8 or n % 8 or n > largest:
            raise SliceError(f"unknown TPU slice {name!r}: {prefix}-N counts TensorCores (2 per chip, 4 chips per "
                             f"host), so N must be a multiple of 8 from 8 to {largest} (e.g. {prefix}-8, "
                             f"{prefix}-32, {prefix}-128); valid forms: {VALID_FORMS}")
        return TpuSlice(str(name), gen, torus_shape(n // 2, dims))
    if n not in _CHIP_COUNTED_SIZES:
        raise SliceError(f"unknown TPU slice {name!r}: {prefix}-N counts chips and N must be one of "
                         f"{', '.join(map(str, _CHIP_COUNTED_SIZES))}; valid forms: {VALID_FORMS}")
    return TpuSlice(str(name), gen, torus_shape(n, dims))


def hosts_for(name: str) -> int:
    """Number of TPU VMs (= JAX processes) in a slice, e.g. hosts_for("v5p-128") == 16."""
    return parse(name).hosts


def smaller_slices(target: TpuSlice) -> list[TpuSlice]:
    """The standard slices of `target`'s generation with at most its chips, smallest first: power-of-two chip
    counts from 4 (v4 / v5p: v5p-8 is 4 chips) or the listed sizes (v5e / v6e: from 1 chip)."""
    prefix, _, counts_cores, _, _, _ = _GENERATIONS[target.generation]
    if counts_cores:
        chips = [4 * 2**k for k in range(20) if 4 * 2**k <= target.chips]
        return [parse(f"{prefix}-{2 * n}") for n in chips]
    return [parse(f"{prefix}-{n}") for n in _CHIP_COUNTED_SIZES if n <= target.chips]
