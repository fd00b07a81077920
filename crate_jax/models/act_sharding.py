"""Activation sharding: between blocks an activation `[B, N, d]` is held batch-sharded (over the mesh axes
`data` and `fsdp`) and whole along every other axis.

Without the constraint XLA's sharding propagation may carry an FSDP weight's `embed` sharding into the
activations and run each matmul with a sharded contraction, i.e. an all-reduce of full activations per
matmul, where FSDP (ZeRO-3) only needs to all-gather each weight once and reduce-scatter its gradient
(docs/scale.md, "FSDP"). The train step is traced under `activation_mesh(mesh)`; a model used alone (tests,
inference on one device) sees no mesh and `constrain` does nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """While a step is traced under this context, `constrain` pins activations to `mesh`."""
    old = getattr(_ACTIVE, "mesh", None)
    _ACTIVE.mesh = mesh
    try:
        yield
    finally:
        _ACTIVE.mesh = old


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_mesh`, or None outside one."""
    return getattr(_ACTIVE, "mesh", None)


def constrain(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """`x` constrained to be sharded over (`data`, `fsdp`) along `batch_dim` and replicated elsewhere, on the
    mesh of `activation_mesh`; unchanged without one, on one device, or when the batch does not divide."""
    mesh = getattr(_ACTIVE, "mesh", None)
    if mesh is None or mesh.size == 1:
        return x
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if not axes or x.shape[batch_dim] % math.prod(mesh.shape[a] for a in axes):
        return x
    spec = [None] * x.ndim
    spec[batch_dim] = axes if len(axes) > 1 else axes[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
