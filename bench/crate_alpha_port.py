"""A straightforward unrolled JAX CRATE-α classifier (docs/math.md §CRATE-α), the reference of
`tests/test_compiled_bytes.py`.

Written as the official big_vision model computes it, without any of our structure: one parameter
dict per layer (no stacked `[L, ...]` arrays to slice), a Python loop over the layers, einsums in the
official order, and flax's `nn.LayerNorm` (`E[x]` and `E[x²]` in one pass,
`var = max(0, E[x²] − E[x]²)`), as the official model calls it. XLA's cost analysis of its
gradient is what a plain JAX CRATE-α costs; ours must not move much more.

    params = init_params(jax.random.key(0), AlphaDims(dim=32, depth=8, heads=2, patch=8, image_size=64))
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AlphaDims:
    """CRATE-α-B/16 at 224 px by default (docs/math.md §Sizes); dictionary 4d, η = λ = 0.1, LayerNorm eps 1e-6."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    patch: int = 16
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    eta: float = 0.1
    lmbda: float = 0.1
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


def init_params(key, dims: AlphaDims) -> dict:
    d, K, P, C = dims.dim, dims.heads, dims.patch, dims.channels
    keys = iter(jax.random.split(key, 4 + 4 * dims.depth))
    ln = lambda: {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}  # noqa: E731
    bound = math.sqrt(6.0 / d)
    layers = [{"ln0": ln(), "proj": 0.02 * jax.random.normal(next(keys), (d, K, d // K)),
               "out": 0.02 * jax.random.normal(next(keys), (K, d // K, d)), "ln1": ln(),
               "D": jax.random.uniform(next(keys), (d, 4 * d), jnp.float32, -bound, bound),
               "D1": jax.random.uniform(next(keys), (d, 4 * d), jnp.float32, -bound, bound)}
              for _ in range(dims.depth)]
    conv = math.sqrt(6.0 / (P * P * C))
    return {"embedding": jax.random.uniform(next(keys), (P, P, C, d), jnp.float32, -conv, conv),
            "embedding_bias": jnp.zeros((d,), jnp.float32),
            "cls": 1e-6 * jax.random.normal(next(keys), (1, 1, d)),
            "pos": 0.02 * jax.random.normal(next(keys), (1, dims.num_patches + 1, d)),
            "layers": layers, "encoder_norm": ln(),
            "head": 0.02 * jax.random.normal(next(keys), (d, dims.num_classes)),
            "head_bias": jnp.zeros((dims.num_classes,), jnp.float32)}


def layer_norm(x, p, eps):
    """flax's `nn.LayerNorm`, which the official model uses (E[x] and E[x²] in one pass)."""
    return nn.LayerNorm(epsilon=eps).apply({"params": p}, x)


def mssa(x, layer):
    """q = k = v = x U (docs/math.md §MSSA), softmax((w/sqrt(p)) wᵀ) per head, output map without bias."""
    w = jnp.einsum("bnd,dkp->bnkp", x, layer["proj"])
    logits = jnp.einsum("bqkp,bskp->bkqs", w / jnp.sqrt(w.shape[-1]).astype(w.dtype), w)
    o = jnp.einsum("bkqs,bskp->bqkp", jax.nn.softmax(logits, axis=-1), w)
    return jnp.einsum("bnkp,kpd->bnd", o, layer["out"])


def odl(x, D, D1, eta, lmbda):
    """Two ISTA steps from a zero code against `D`, decoded with `D1` (docs/math.md §ODL)."""
    z1 = jax.nn.relu(eta * jnp.einsum("pd,nlp->nld", D, x) - eta * lmbda)
    dz1 = jnp.einsum("dp,nlp->nld", D, z1)
    z2 = jax.nn.relu(z1 - eta * jnp.einsum("pd,nlp->nld", D, dz1 - x) - eta * lmbda)
    return jnp.einsum("dp,nlp->nld", D1, z2)


def forward(params, images, dims: AlphaDims):
    """`images [B, H, W, C]` -> logits `[B, num_classes]`."""
    B = images.shape[0]
    P = dims.patch
    x = jax.lax.conv_general_dilated(images, params["embedding"], (P, P), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embedding_bias"]
    x = x.reshape(B, -1, dims.dim)
    x = jnp.concatenate([jnp.tile(params["cls"], (B, 1, 1)), x], axis=1) + params["pos"]
    for layer in params["layers"]:
        x = x + mssa(layer_norm(x, layer["ln0"], dims.eps), layer)
        x = x + odl(layer_norm(x, layer["ln1"], dims.eps), layer["D"], layer["D1"], dims.eta, dims.lmbda)
    x = layer_norm(x, params["encoder_norm"], dims.eps)[:, 0]
    return x @ params["head"] + params["head_bias"]


def loss_fn(params, images, labels, dims: AlphaDims):
    logits = forward(params, images, dims)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))
