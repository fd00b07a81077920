"""The device mesh: axes `data`, `fsdp`, `tensor`, sized from the config (`-1` = the rest)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    pass


def resolve_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
    """`{'data': -1, 'fsdp': 2, 'tensor': 1}` on 8 devices -> `(4, 2, 1)`."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"config.mesh: unknown axes {unknown}; the mesh axes are {AXES}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise MeshError(f"config.mesh: only one axis may be -1 (the rest), got {dict(zip(AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            fixed = ", ".join(f"--config.mesh.{a}=1" for a, sz in zip(AXES, shape) if sz > 1)
            raise MeshError(f"config.mesh: {dict(zip(AXES, shape))} cannot fill {num_devices} devices: "
                            f"{num_devices} is not divisible by {known} (a recipe's mesh is laid out for a TPU "
                            f"slice; on this machine pass sizes that divide {num_devices}, e.g. {fixed})")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(f"config.mesh: data×fsdp×tensor = {'×'.join(map(str, shape))} = {math.prod(shape)} "
                        f"but there are {num_devices} devices; make the product {num_devices} or set one axis "
                        f"to -1")
    return tuple(shape)


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """A mesh with Auto axis types (GSPMD style: XLA inserts the collectives)."""
    sizes = dict(sizes)
    n = sizes.pop("num_devices", None)  # optional: use only the first n devices (tests, benchmarks)
    devices = list(jax.devices() if devices is None else devices)
    if n:
        if n > len(devices):
            raise MeshError(f"config.mesh.num_devices = {n} but only {len(devices)} devices exist")
        devices = devices[:n]
    shape = resolve_shape(sizes, len(devices))
    try:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    except Exception:  # noqa: BLE001 - e.g. a device list that make_mesh cannot lay out
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
