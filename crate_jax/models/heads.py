"""Projection heads for self-supervised training.

`DINOHead` is DINO's projection MLP as SimDINO uses it (official `vision_transformer.DINOHead` with
the last, prototype layer removed, SimDINO `main_dino.py` args `hidden_dim=2048`, `z_dim=256`):
`Linear(d, h) → GELU → Linear(h, h) → GELU → Linear(h, z)` (for `layers` = 3), then L2 normalisation
`z / max(‖z‖, 1e-12)` (torch `F.normalize`). No prototypes, no centring, no weight-normalised last layer.
With `prototypes = K > 0` it is the classic DINO head: the normalised `z` goes through DINO's
weight-normalised `last_layer` (`nn.utils.weight_norm(Linear(z, K, bias=False))`), `logits = z · g ⊙ v/‖v‖`
with each prototype's column `v_k` normalised; `g` is fixed at 1 with `norm_last_layer` (the official
default), else a learned `[K]` scale. `v` starts as torch's Linear default, uniform(±1/√z).
Init: timm `trunc_normal_(std=0.02)` (cut at ±2, i.e. ±100σ: effectively N(0, 0.02²)), biases 0; the
GELU is the exact (erf) one, torch's `nn.GELU` default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(‖x‖, eps)` over the last axis, with a finite gradient at `x = 0`."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class DINOHead(nnx.Module):
    """`[..., d] -> [..., out_dim]`, L2-normalised."""

    def __init__(self, width: int, *, hidden: int, out_dim: int, layers: int = 3, dtype, param_dtype,
                 rngs: nnx.Rngs, prototypes: int = 0, norm_last_layer: bool = True):
        if layers < 1:
            raise ValueError(f"DINOHead needs >= 1 layers, got {layers}")
        dims = [width] + [hidden] * (layers - 1) + [out_dim]
        axes = [("embed",)] + [("mlp",)] * (layers - 1) + [(None,)]
        self.layers = nnx.List([
            L.Dense((dims[i],), (dims[i + 1],), in_axes=axes[i], out_axes=axes[i + 1] if i + 1 < layers else (None,),
                    use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=L.normal(0.02))
            for i in range(layers)])
        self.last_layer = (PrototypeLayer(out_dim, prototypes, norm=norm_last_layer, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs) if prototypes else None)

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = jax.nn.gelu(x, approximate=False)
        x = l2_normalize(x)
        return x if self.last_layer is None else self.last_layer(x)


class PrototypeLayer(nnx.Module):
    """DINO's weight-normalised last layer `[..., z] -> [..., K]`: `v [z, K]`, and `g [K]` unless `norm`."""

    def __init__(self, dim: int, prototypes: int, *, norm: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.v = L.param(rngs, L.uniform(dim ** -0.5), (dim, prototypes), (None, None), param_dtype)
        self.g = None if norm else L.param(rngs, L.ones, (prototypes,), (None,), param_dtype)

    def __call__(self, x):
        v = self.v[...].astype(jnp.float32)
        w = v * jax.lax.rsqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
        if self.g is not None:
            w = w * self.g[...].astype(jnp.float32)
        return (x.astype(jnp.float32) @ w).astype(jnp.promote_types(self.dtype, jnp.float32))
