"""One encoder layer of each family (docs/math.md §CRATE, §CRATE-α, ViT pre-LN).

Every block has the signature `block(x, *, key, drop_rate, mask, capture) -> x` with
`x [B, N, d]`; `key` is None at evaluation (no dropout / drop-path), and `capture` is a dict that
the block fills with its intermediates for analysis, or None.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.act_sharding import constrain_tokens
from crate_jax.models.config import BlockConfig


def _dtypes(cfg: BlockConfig):
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _keys(key, n):
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


class CrateBlock(nnx.Module):
    """`z = x + MSSA(LN1(x))`, then `x_next = ISTA(LN2(z))` – no residual around ISTA (docs/math.md §CRATE).

    `inits` may replace the MSSA initialisers (`proj`, `out`, `out_bias`); the default is torch's
    nn.Linear init of the image model (docs/math.md §CRATE). CRATE-GPT passes its nanoGPT-style init (§Language models).
    """

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs, inits: dict | None = None):
        dt = _dtypes(cfg)
        d = cfg.width
        torch_linear = L.uniform(1.0 / math.sqrt(d))  # torch nn.Linear default init, fan_in = d (= K·p)
        inits = dict(dict(proj=torch_linear, out=torch_linear, out_bias=torch_linear), **(inits or {}))
        self.dropout = cfg.dropout
        self.ln1 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.mssa = L.MSSA(d, cfg.num_heads, out_bias=cfg.attn_out_bias, causal=cfg.causal, attention=cfg.attention,
                           rngs=rngs, proj_init=inits["proj"], out_init=inits["out"], out_bias_init=inits["out_bias"],
                           **dt)
        self.ln2 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.ista = L.ISTA(d, eta=cfg.eta, lmbda=cfg.lmbda, rngs=rngs, **dt)

    def __call__(self, x, *, key=None, drop_rate=0.0, mask=None, capture=None):
        k_drop, k_path = _keys(key, 2)
        y = L.dropout(self.mssa(self.ln1(x), mask=mask, capture=capture), self.dropout, k_drop)
        z = constrain_tokens(x + L.drop_path(y, drop_rate, k_path))  # models/act_sharding.py
        out = self.ista(self.ln2(z))
        if capture is not None:
            capture["code"] = out  # the ISTA output Z^{l+1} is the sparse code itself
        return out


class CrateAlphaBlock(nnx.Module):
    """`x += MSSA(LN_0(x))`, `x += ODL(LN_1(x))` with dropout and drop-path (docs/math.md §CRATE-α)."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        d = cfg.width
        self.dropout, self.residual = cfg.dropout, cfg.odl_residual
        self.ln1 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.mssa = L.MSSA(d, cfg.num_heads, out_bias=cfg.attn_out_bias, causal=cfg.causal, attention=cfg.attention,
                           rngs=rngs, proj_init=L.normal(0.02), out_init=L.normal(0.02), **dt)
        self.ln2 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.odl = L.ODL(d, ratio=cfg.odl_ratio, steps=cfg.odl_steps, decoupled=cfg.odl_decoupled, eta=cfg.eta,
                         lmbda=cfg.lmbda, rngs=rngs, **dt)

    def __call__(self, x, *, key=None, drop_rate=0.0, mask=None, capture=None):
        k1, k2, k3, k4 = _keys(key, 4)
        y = L.dropout(self.mssa(self.ln1(x), mask=mask, capture=capture), self.dropout, k1)
        x = constrain_tokens(x + L.drop_path(y, drop_rate, k2))  # models/act_sharding.py
        y = L.dropout(self.odl(self.ln2(x), capture=capture), self.dropout, k3)
        y = L.drop_path(y, drop_rate, k4)
        return x + y if self.residual else y


class ViTBlock(nnx.Module):
    """Pre-LN transformer block: `x += MHA(LN(x))`, `x += MLP(LN(x))`. `cfg.init` / `cfg.gelu` pick the
    big_vision or the DINO flavour (`crate_jax.models.config.INITS`); explicit `inits` win over both inits."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs, inits: dict | None = None):
        dt = _dtypes(cfg)
        d = cfg.width
        if inits is None and cfg.init == "dino":  # DINO ViT `_init_weights`: every Linear trunc-normal(0.02), bias 0
            tn = L.trunc_normal(0.02)
            inits = dict(qkv=tn, out=tn, mlp_in=tn, mlp_out=tn, mlp_bias=L.zeros)
        inits = inits or dict(qkv=L.xavier_uniform(d, d), out=L.xavier_uniform(d, d),
                              mlp_in=L.xavier_uniform(d, cfg.mlp_dim), mlp_out=L.xavier_uniform(cfg.mlp_dim, d),
                              mlp_bias=L.normal(1e-6))
        self.dropout = cfg.dropout
        self.ln1 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.attn = L.MultiHeadAttention(d, cfg.num_heads, causal=cfg.causal, attention=cfg.attention, rngs=rngs,
                                         qkv_init=inits["qkv"], out_init=inits["out"], **dt)
        self.ln2 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.mlp = L.MLP(d, cfg.mlp_dim, rngs=rngs, in_init=inits["mlp_in"], out_init=inits["mlp_out"],
                         bias_init=inits.get("mlp_bias", L.zeros), approximate=cfg.gelu == "tanh", **dt)

    def __call__(self, x, *, key=None, drop_rate=0.0, mask=None, capture=None):
        k1, k2, k3, k4 = _keys(key, 4)
        y = L.dropout(self.attn(self.ln1(x), mask=mask, capture=capture), self.dropout, k1)
        x = constrain_tokens(x + L.drop_path(y, drop_rate, k2))  # models/act_sharding.py
        y = L.dropout(self.mlp(self.ln2(x), capture=capture), self.dropout, k3)
        return x + L.drop_path(y, drop_rate, k4)


BLOCKS = {"crate": CrateBlock, "crate_alpha": CrateAlphaBlock, "vit": ViTBlock}
