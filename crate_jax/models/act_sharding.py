"""Activation sharding: between blocks an activation `[B, N, d]` is held batch-sharded (over the mesh axes
`data` and `fsdp`) and, on a mesh with a `tensor` axis, token-sharded over `tensor` (sequence parallelism).

Without the constraint XLA's sharding propagation may carry an FSDP weight's `embed` sharding into the
activations and run each matmul with a sharded contraction, i.e. an all-reduce of full activations per
matmul, where FSDP (ZeRO-3) only needs to all-gather each weight once and reduce-scatter its gradient
(docs/scale.md, "FSDP"). The train step is traced under `activation_mesh(mesh)`; a model used alone (tests,
inference on one device) sees no mesh and `constrain` does nothing.

Sequence parallelism (Korthikanti et al. 2022): tensor parallelism splits each block's matmuls over `tensor`
(heads, the dictionary's atoms), but the work between them (LayerNorms, residual adds, dropout) is per token,
and with the residual stream replicated over `tensor` every chip of a tensor group repeats it for all tokens.
Holding the residual stream split along its tokens over `tensor` gives each chip 1/tensor of that work and of
its bytes; the all-reduce that ends each tensor-parallel matmul becomes a reduce-scatter, and the next matmul
starts with an all-gather of its input (the same bytes on the wire). The values are the same.
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "tensor"
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


def constrain(x: jax.Array, batch_dim: int = 0, seq_dim: int | None = None) -> jax.Array:
    """`x` constrained to be sharded over (`data`, `fsdp`) along `batch_dim`, over `tensor` along `seq_dim`
    (when given), and replicated elsewhere, on the mesh of `activation_mesh`; unchanged without one or on one
    device. An axis whose length the mesh axes do not divide stays whole."""
    mesh = getattr(_ACTIVE, "mesh", None)
    if mesh is None or mesh.size == 1:
        return x
    spec = [None] * x.ndim
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if axes and x.shape[batch_dim] % math.prod(mesh.shape[a] for a in axes) == 0:
        spec[batch_dim] = axes if len(axes) > 1 else axes[0]
    if seq_dim is not None and _tokens_divide(mesh, x, seq_dim):
        spec[seq_dim] = SEQUENCE_AXIS
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def constrain_tokens(x: jax.Array, seq_dim: int = 1) -> jax.Array:
    """Inside a block: `constrain(x, seq_dim=seq_dim)` where the mesh has a `tensor` axis dividing the tokens,
    else `x` unchanged (its batch sharding propagates from the block's input)."""
    mesh = getattr(_ACTIVE, "mesh", None)
    return constrain(x, seq_dim=seq_dim) if _tokens_divide(mesh, x, seq_dim) else x


def _tokens_divide(mesh: Mesh | None, x: jax.Array, seq_dim: int) -> bool:
    """Whether `mesh` has a `tensor` axis of more than one device that divides `x`'s tokens."""
    t = 1 if mesh is None else mesh.shape.get(SEQUENCE_AXIS, 1)
    return t > 1 and x.shape[seq_dim] % t == 0
