"""One table from logical axis names to mesh axes, and the shardings derived from it.

Parameters carry logical names (`crate_jax.models.layers.param`). FSDP shards the `embed` axis
over `fsdp`; tensor parallelism splits heads and the dictionary / MLP width over `tensor`. A
dimension that the mesh axis does not divide stays replicated, so any mesh works for any model.
Every variable collection of a model (parameters and the rest) and every part of the train state
gets its sharding from these rules.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_RULES: dict[str | None, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "classes": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "patch": None,
    "channels": None,
    "tokens": None,
    None: None,
}


@dataclasses.dataclass(frozen=True)
class Axes:
    """The logical axis names of one array, as a pytree *leaf* (a bare tuple would be a pytree node)."""

    names: tuple[str | None, ...]

    @classmethod
    def replicated(cls, ndim: int) -> "Axes":
        return cls((None,) * ndim)


def logical_to_spec(axes, shape, mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for an array with logical `axes`; undividable or repeated mesh axes fall back to None."""
    used: set[str] = set()
    spec = []
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
    for name, size in zip(axes, shape):
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(map(str, rules))}")
        target = rules[name]
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if mesh.shape.get(n, 1) > 1 and n not in used)
        n_shards = 1
        for n in names:
            n_shards *= mesh.shape[n]
        if not names or size % n_shards:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def variable_axes(var: nnx.Variable) -> Axes:
    """A variable's logical axes (replicated when it declares none)."""
    axes = var.get_metadata().get("logical_axes")
    return Axes(tuple(axes)) if axes else Axes.replicated(len(var.shape))


def _to_pure(state: nnx.State, fn) -> dict:
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = fn(var)
    return out


def state_axes(state: nnx.State) -> dict:
    """A tree of `Axes`, the structure of `nnx.to_pure_dict(state)`."""
    return _to_pure(state, variable_axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> dict:
    """Shardings for `nnx.to_pure_dict(state)` (any variable collection, abstract or concrete)."""
    return _to_pure(state, lambda v: NamedSharding(mesh, logical_to_spec(variable_axes(v).names, v.shape, mesh,
                                                                         rules)))


def axes_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for a tree of arrays (`shapes_tree`: arrays or ShapeDtypeStructs) from a matching tree
    of `Axes`; a mismatch in structure names the first differing path."""
    try:
        return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a.names, s.shape, mesh, rules)),
                            axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, Axes))
    except ValueError as e:
        raise ValueError(f"logical axes do not match the arrays they describe: {e}") from e


def param_shardings(param_state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """A State of NamedShardings matching `param_state` (abstract or concrete)."""
    def one(var):
        return NamedSharding(mesh, logical_to_spec(variable_axes(var).names, var.shape, mesh, rules))
    return jax.tree.map(one, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def pure_param_shardings(abstract_model: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> dict:
    """Shardings for `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, as the same nested dict."""
    return state_shardings(nnx.state(abstract_model, nnx.Param), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over (`data`, `fsdp`), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> one global jax.Array per key, batch axis over (data, fsdp)."""
    import numpy as np
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

