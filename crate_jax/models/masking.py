"""Token masking: which patch tokens a model sees (CLIPA-style token reduction, MAE masking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def drop_patches(x: jax.Array, ratio: float, key: jax.Array) -> jax.Array:
    """Keeps the cls token and a random `int(N (1 − ratio))` of the `N` patch tokens per example,
    in their original order: `[B, 1 + N, d] -> [B, 1 + n_keep, d]`."""
    B, n1, d = x.shape
    n = n1 - 1
    keep = max(1, int(n * (1.0 - ratio)))
    noise = jax.random.uniform(key, (B, n))
    idx = jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1)
    patches = jnp.take_along_axis(x[:, 1:], idx[:, :, None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)


def mae_random_mask(key: jax.Array, batch: int, length: int, ratio: float) -> jax.Array:
    """MAE's per-sample masking (docs/math.md §CRATE-MAE): `noise ~ U[0,1)^[B, L]`, the `int(L (1 − ratio))`
    lowest-noise patches are kept. Returns bool `[B, L]`, True = removed. `noise`'s argsort is the official
    `ids_shuffle`; a patch is removed iff its rank in it is `>= len_keep` (the official unshuffled mask)."""
    keep = int(length * (1.0 - ratio))
    noise = jax.random.uniform(key, (batch, length))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return ranks >= keep
