"""Image classifiers: CRATE (docs/math.md §CRATE), CRATE-α (docs/math.md §CRATE-α) and the ViT baseline.

All three share the pipeline `stem → [cls] + pos → Encoder → final LN → pool → head`; they differ
in the stem (CRATE: patchify → LN → Linear → LN; CRATE-α / ViT: a stride-P conv), in the block,
and in where the final LN sits (CRATE: after pooling, on the pooled feature; others: on all tokens).
Input images are NHWC `[B, H, W, C]`, already normalised.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models import posemb
from crate_jax.models.blocks import BLOCKS
from crate_jax.models.config import ConfigError, ModelConfig
from crate_jax.models.encoder import Encoder


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """`[B, H, W, C] -> [B, N, P, P, C]`, patches row-major over the grid; the flattened feature
    order `(p1, p2, c)` matches CRATE's einops rearrange and a conv kernel `[P, P, C, d]`."""
    B, H, W, C = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, h, patch, w, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * w, patch, patch, C)


class ImageClassifier(nnx.Module):
    """`model(images [B, H, W, C]) -> logits [B, num_classes]` (pooled features if num_classes == 0)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        pd = dt["param_dtype"]
        d, P, C = cfg.width, cfg.patch_size, cfg.channels
        n_tokens = cfg.num_patches + 1
        if cfg.model == "crate":
            fan = P * P * C
            lin = L.uniform(1.0 / math.sqrt(fan))
            self.patch_norm = L.LayerNorm(fan, eps=1e-5, rngs=rngs, **dt)
            self.embedding = L.Dense((fan,), (d,), in_axes=("patch",), out_axes=("embed",), use_bias=cfg.stem_bias,
                                     rngs=rngs, kernel_init=lin, bias_init=lin, **dt)
            self.embed_norm = L.LayerNorm(d, eps=1e-5, rngs=rngs, **dt)
            cls_init = pos_init = L.normal(1.0)  # torch.randn (docs/math.md §CRATE)
        else:
            self.patch_norm = self.embed_norm = None
            if cfg.init == "dino":  # torch Conv2d default (bound 1/√fan_in, bias too); trunc-normal cls and table
                conv = conv_bias = L.uniform(1.0 / math.sqrt(P * P * C))
                cls_init = pos_init = L.trunc_normal(0.02)
            else:
                conv = L.uniform(math.sqrt(6.0 / (P * P * C)))  # flax kaiming_uniform (docs/math.md §CRATE-α)
                conv_bias = L.zeros
                cls_init = L.normal(1e-6) if cfg.model == "crate_alpha" else L.zeros
                pos_init = L.normal(0.02)
            self.embedding = L.Dense((P, P, C), (d,), in_axes=("patch", "patch", "channels"), out_axes=("embed",),
                                     use_bias=cfg.stem_bias, rngs=rngs, kernel_init=conv, bias_init=conv_bias, **dt)
        self.cls = L.param(rngs, cls_init, (1, 1, d), (None, None, "embed"), pd)
        if cfg.posemb == "learn":
            self.pos_embedding = L.param(rngs, pos_init, (1, n_tokens, d), (None, "tokens", "embed"), pd)
        else:
            self.pos_embedding = None
        self.encoder = Encoder(cfg.block, BLOCKS[cfg.model], rngs=rngs)
        self.encoder_norm = L.LayerNorm(d, eps=cfg.final_ln_eps, rngs=rngs, **dt)
        if cfg.num_classes:
            if cfg.model == "crate":
                k_init = b_init = L.uniform(1.0 / math.sqrt(d))
            elif cfg.model == "crate_alpha":
                k_init, b_init = L.normal(0.02), L.zeros
            elif cfg.init == "dino":
                k_init, b_init = L.trunc_normal(0.02), L.zeros
            else:
                k_init = b_init = L.zeros
            self.head = L.Dense((d,), (cfg.num_classes,), in_axes=("embed",), out_axes=("classes",),
                                use_bias=cfg.head_bias, rngs=rngs, kernel_init=k_init, bias_init=b_init, **dt)
        else:
            self.head = None

    # ------------------------------------------------------------------------------------------
    def position_table(self) -> jax.Array:
        if self.pos_embedding is not None:
            return self.pos_embedding[...]
        return posemb.sincos_2d_with_cls(self.cfg.grid, self.cfg.width)

    def embed(self, images: jax.Array, key=None) -> jax.Array:
        """`[B, H, W, C] -> [B, N+1, d]`: stem, cls token, position embedding."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ConfigError(
                f"images of shape {tuple(images.shape)} do not fit this model, which expects NHWC "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.channels}]; resample the position embedding "
                f"for another resolution (predict --interpolate-posemb, or crate_jax.models.posemb)")
        dtype = jnp.dtype(cfg.dtype)
        x = patchify(images.astype(dtype), cfg.patch_size)  # [B, N, P, P, C]
        if cfg.model == "crate":
            x = self.embed_norm(self.embedding(self.patch_norm(x.reshape(x.shape[0], x.shape[1], -1))))
        else:
            x = self.embedding(x)
        cls = jnp.broadcast_to(self.cls[...].astype(dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.position_table().astype(dtype)
        return L.dropout(x, cfg.emb_dropout, key)

    def pool(self, x: jax.Array) -> jax.Array:
        """Final LN and pooling, `[B, N+1, d] -> [B, d]`."""
        if self.cfg.model == "crate":  # docs/math.md §CRATE: pool first, then LN on the pooled vector
            feat = x[:, 0] if self.cfg.pool == "cls" else x.mean(axis=1)
            return self.encoder_norm(feat)
        x = self.encoder_norm(x)
        return x[:, 0] if self.cfg.pool == "cls" else x.mean(axis=1)

    def __call__(self, images, *, train: bool = False, rng: jax.Array | None = None, capture: bool = False):
        """Logits `[B, num_classes]`; with `capture=True` returns `(logits, captures)` where captures hold
        per-layer `[depth, B, ...]` intermediates (`mssa_w`, `code`, `out`) and `tokens_in`."""
        k_emb, k_enc = (None, None) if (rng is None or not train) else tuple(jax.random.split(rng))
        x = self.embed(images, k_emb)
        x_in = x
        x, caps = self.encoder(x, key=k_enc, capture=capture)
        out = self.pool(x)
        if self.head is not None:
            out = self.head(out)
        if capture:
            return out, dict(caps, tokens_in=x_in, tokens_out=x)
        return out


def build_model(cfg: ModelConfig, seed: int | jax.Array = 0) -> ImageClassifier:
    """A freshly initialised image classifier for `cfg` (the constructor of bundle kind 'classifier')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return ImageClassifier(cfg, rngs=nnx.Rngs(params=key))
