"""A stack of identical blocks, stored stacked (`[depth, ...]` on every parameter).

The parameter layout is the same whether the forward pass runs as `jax.lax.scan` (one block is
compiled, for deep models) or as an unrolled Python loop, so the two modes share checkpoints and
give the same numbers. Remat policies wrap the per-layer function in both modes.

The unrolled loop takes its layers' parameters with one `lax.unstack` per stacked array: its
gradient is a single stack of the per-layer gradients. Indexing `a[i]` per layer instead has the
gradient pad each layer's piece to the full `[depth, ...]` shape and sum `depth` of them, which XLA
only sometimes folds away (bench/RESULTS.md, "Profiles").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.act_sharding import constrain
from crate_jax.models.config import BlockConfig

REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Encoder(nnx.Module):
    """`depth` blocks of `block_cls`; `x [B, N, d] -> x [B, N, d]` (plus per-layer captures)."""

    def __init__(self, cfg: BlockConfig, block_cls, *, rngs: nnx.Rngs, block_kwargs: dict | None = None):
        self.depth, self.scan, self.remat, self.drop_path = cfg.depth, cfg.scan, cfg.remat, cfg.drop_path
        self.stochastic = bool(cfg.dropout or cfg.drop_path)
        keys = jax.random.split(rngs.params(), cfg.depth)
        make = lambda k: block_cls(cfg, rngs=nnx.Rngs(params=k), **(block_kwargs or {}))
        self.blocks = nnx.vmap(make, in_axes=0, out_axes=0)(keys)
        for _, var in nnx.iter_graph(self.blocks):  # the stacked axis is a logical axis too
            if isinstance(var, nnx.Variable):
                var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))

    def __call__(self, x, *, key=None, mask=None, capture: bool = False):
        """Returns `(x, captures)`; `captures` maps names to `[depth, ...]` arrays (empty unless asked).

        `key` drives dropout and drop-path only; with both rates 0 the blocks get None, as at evaluation
        (a rate-0 drop-path would still draw and apply an all-ones mask)."""
        graphdef, params = nnx.split(self.blocks)
        rates = jnp.linspace(0.0, self.drop_path, self.depth) if self.drop_path else jnp.zeros((self.depth,))
        keys = None if key is None or not self.stochastic else jax.random.split(key, self.depth)

        def layer(x, xs):
            p, k, rate = xs
            block = nnx.merge(graphdef, p)
            cap = {} if capture else None
            y = block(x, key=k, drop_rate=rate if self.drop_path else 0.0, mask=mask, capture=cap)
            y = constrain(y, seq_dim=1)  # batch- and token-sharded between blocks (models/act_sharding.py)
            if capture:
                cap["out"] = y
            return y, (cap or {})

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan)

        x = constrain(x, seq_dim=1)
        if self.scan:
            return jax.lax.scan(layer, x, (params, keys, rates))
        leaves, treedef = jax.tree.flatten((params, keys, rates))
        columns = [jax.lax.unstack(a, axis=0) for a in leaves]  # per leaf: its `depth` layer slices
        caps = []
        for i in range(self.depth):
            x, cap = layer(x, treedef.unflatten([c[i] for c in columns]))
            caps.append(cap)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *caps) if capture else {}
