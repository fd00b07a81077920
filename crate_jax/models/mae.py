"""CRATE-MAE (docs/math.md §CRATE-MAE, official `model/crate_ae/*`): a masked autoencoder whose decoder is the encoder's
structure transposed and applied in reverse.

* **Encoder.** Patch embedding (a stride-P conv with bias, here a Dense over `(P, P, C)` patches), the
  removed patches replaced by copies of `mask_token` *in place* (the encoder sees the full length-L
  sequence, cls first), `decoder_pos_embed` added (not `pos_embed`), then CRATE layers (docs/math.md §CRATE) with
  `λ = 0.5`, and `norm` (LayerNorm eps 1e-6).
* **Decoder layer** (`layers.0` = linear synthesis, `layers.1` = MSSA): `y = LN0(x) @ Dᵀ`, then
  `x_next = y − MSSA(LN1(y))`, applied directly to the encoder output (`decoder_embed` exists, is
  trainable and is never used, as in the official code); then `decoder_norm` (eps 1e-6), `decoder_pred`
  (d → P²·C) and the cls row dropped.
* **Fixed tables.** `pos_embed` and `decoder_pos_embed` are the MAE 2-D sincos tables (docs/math.md §Position tables,
  `ω_i = 10000^(−i/(d/4))`, zero cls row). They are `FixedTable` variables (not `nnx.Param`): not
  trained, not counted as trainable, sharded and checkpointed as buffers, rebuilt from the config when
  a bundle is loaded.

Masks are bool `[B, L]` with True = removed (`crate_jax.models.masking.mae_random_mask` draws the
official noise-argsort masks). Images are NHWC, already normalised; predictions `[B, L, P²·C]` are in the
patch feature order `(p, q, c)` of `classifier.patchify` (the official `patchify`).

Parameter tree: `patch_embed/{kernel [P,P,C,d], bias}`, `cls`, `mask_token`, `encoder/blocks/...`
(stacked CRATE blocks), `norm`, `decoder_embed/{kernel, bias}`, `decoder/blocks/{ln1, synth/D, ln2,
mssa/...}`, `decoder_norm`, `decoder_pred/{kernel, bias}`; buffers `pos_embed`, `decoder_pos_embed`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.blocks import CrateBlock
from crate_jax.models.classifier import patchify
from crate_jax.models.config import BlockConfig, ConfigError, Serialised
from crate_jax.models.encoder import Encoder
from crate_jax.models.flops import block_flops

# name -> (width, depth, heads): `mae_crate_{tiny,small,base,large}` (docs/math.md §CRATE-MAE); the decoder has the
# encoder's width, depth and heads in every preset.
MAE_VARIANTS = {"T": (384, 12, 6), "S": (576, 12, 12), "B": (768, 12, 12), "L": (1024, 24, 16)}
# docs/math.md §CRATE-MAE, counted from the official code: (all, trainable) at 224 px, patch 16.
MAE_PARAM_COUNTS = {"T": (11_555_328, 11_404_032), "S": 25_405_824, "B": 44_638_464, "L": 154_274_560}


class FixedTable(nnx.Variable):
    """A fixed, non-trained array of the model (MAE's sincos position tables): a buffer, not a Param."""


def mae_sincos_2d(grid: int, width: int) -> np.ndarray:
    """CRATE-MAE `get_2d_sincos_pos_embed(width, grid, cls_token=True)` (docs/math.md): `[1 + grid², width]`
    float32, per token `[sin(cω), cos(cω), sin(rω), cos(rω)]` for column c and row r (tokens row-major)
    with `ω_i = 10000^(−i/(width/4))`, i < width/4, and a zero first row for the cls token. Computed in
    float32 as the official numpy code does."""
    if width % 4:
        raise ConfigError(f"the MAE sincos table needs a width divisible by 4, got {width}")
    omega = np.arange(width // 4, dtype=np.float32) / np.float32(width / 4.0)
    omega = (1.0 / 10000 ** omega).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    c = np.einsum("m,d->md", cols.reshape(-1), omega)
    r = np.einsum("m,d->md", rows.reshape(-1), omega)
    table = np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1).astype(np.float32)
    return np.concatenate([np.zeros((1, width), np.float32), table], axis=0)


@dataclasses.dataclass(frozen=True)
class MAEConfig(Serialised):
    """Everything that fixes a CRATE-MAE's parameters and forward pass (the JSON a bundle stores)."""

    kind: ClassVar[str] = "crate_mae"  # the bundle kind (crate_jax.models.registry)
    what: ClassVar[str] = "CRATE-MAE"  # names it in errors (Serialised)

    variant: str
    block: BlockConfig  # the encoder's CRATE blocks (λ = 0.5, LayerNorm eps 1e-5: the official defaults)
    patch_size: int = 16
    image_size: int = 224
    channels: int = 3
    decoder_depth: int = 0  # 0: the encoder's depth (every official preset)
    decoder_num_heads: int = 0  # 0: the encoder's heads
    final_ln_eps: float = 1e-6  # `norm` and `decoder_norm`
    use_softmax: bool = True  # decoder MSSA: False replaces its softmax by the identity (official option)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False  # official constructor default; the MAE recipe (configs/mae.py) turns it on
    pool: str = "cls"  # features for probes: the encoder's cls token, or the mean of its patch tokens

    def __post_init__(self):
        self.validate()

    @classmethod
    def block_family(cls, own):
        return "crate"

    @classmethod
    def complete_block(cls, own, options):
        """The official `crate_ae` blocks: λ = 0.5 (`lambd`), torch's LayerNorm eps, MSSA output bias."""
        options.setdefault("lmbda", 0.5)
        options.setdefault("ln_eps", 1e-5)
        options.setdefault("attn_out_bias", True)
        return options

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def encoder_block(self) -> BlockConfig:
        return self.block

    @property
    def decoder_block(self) -> BlockConfig:
        # the decoder's FeedForward has a `lambd` (5.0) that its forward never uses
        return self.block.replace(depth=self.decoder_depth or self.depth,
                                  num_heads=self.decoder_num_heads or self.num_heads)

    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"CRATE-MAE config field '{field}': {msg}")

        if self.pool not in ("cls", "mean"):
            bad("pool", f"got {self.pool!r}, expected one of ('cls', 'mean')")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            bad("image_size", f"{self.image_size} px is not divisible by patch size {self.patch_size}")
        if self.width % 4:
            bad("width", f"the sincos position tables need a width divisible by 4, got {self.width}")
        if not 0.0 <= self.mask_ratio < 1.0:
            bad("mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 0 or self.decoder_num_heads < 0:
            bad("decoder_depth", "decoder_depth and decoder_num_heads must be >= 0 (0: as the encoder)")
        if self.decoder_num_heads and self.width % self.decoder_num_heads:
            bad("decoder_num_heads", f"width {self.width} is not divisible by {self.decoder_num_heads} heads")


def mae_config(variant: str = "T/16", **overrides) -> MAEConfig:
    """`mae_config('B/16', image_size=224)`; sizes from `MAE_VARIANTS` (the patch after '/', default 16)."""
    name, _, patch = variant.partition("/")
    if name not in MAE_VARIANTS:
        raise ConfigError(f"unknown CRATE-MAE variant {variant!r}; known sizes: {sorted(MAE_VARIANTS)} (e.g. 'T/16')")
    if patch and not patch.isdigit():
        raise ConfigError(f"variant {variant!r}: the part after '/' must be the patch size, e.g. '{name}/16'")
    width, depth, heads = MAE_VARIANTS[name]
    fields = dict(variant=f"{name}/{patch or 16}", width=width, depth=depth, num_heads=heads,
                  patch_size=int(patch or 16))
    fields.update(overrides)
    return MAEConfig.build(**fields)


# ------------------------------------------------------------------------------------------------
class Synthesis(nnx.Module):
    """The decoder's linear layer (official `FeedForward` of `crate_decoder.py`): `y = x @ Dᵀ`, no bias,
    no ReLU (`D = 0.fn.weight [d, d]`, kaiming-uniform init as the official `nn.Parameter`)."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.D = L.param(rngs, L.uniform(math.sqrt(6.0 / width)), (width, width), ("embed", "mlp"), param_dtype)

    def __call__(self, x):
        return x.astype(self.dtype) @ self.D[...].astype(self.dtype).T


class CrateDecoderBlock(nnx.Module):
    """`y = LN0(x) @ Dᵀ; x_next = y − MSSA(LN1(y))` (docs/math.md §CRATE-MAE). Same signature as the encoder blocks."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs, use_softmax: bool = True):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        d = cfg.width
        xavier = L.xavier_uniform(d, d)
        self.use_softmax = use_softmax
        self.ln1 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.synth = Synthesis(d, rngs=rngs, **dt)
        self.ln2 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.mssa = L.MSSA(d, cfg.num_heads, out_bias=True, causal=False, attention=cfg.attention, rngs=rngs,
                           proj_init=xavier, out_init=xavier, out_bias_init=L.zeros, **dt)

    def _attention(self, h, capture):
        if self.use_softmax:
            return self.mssa(h, capture=capture)
        w = self.mssa.proj(h)  # [B, N, K, p]; the official `use_softmax=False`: weights w wᵀ/sqrt(p), no softmax
        if capture is not None:
            capture["mssa_w"] = w
        weights = jnp.einsum("btkp,bskp->bkts", w, w) / math.sqrt(w.shape[-1])
        return self.mssa.out(jnp.einsum("bkts,bskp->btkp", weights, w))

    def __call__(self, x, *, key=None, drop_rate=0.0, mask=None, capture=None):
        del key, drop_rate, mask  # the official decoder has no dropout / drop-path / attention mask
        y = self.synth(self.ln1(x))
        return y - self._attention(self.ln2(y), capture)


class CrateMAE(nnx.Module):
    """`model(images [B,H,W,C], mask [B,L]) -> pred [B, L, P²·C]`; `encode`, `decode`, `features`."""

    def __init__(self, cfg: MAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        pd = dt["param_dtype"]
        d, P, C = cfg.width, cfg.patch_size, cfg.channels
        fan = P * P * C
        # timm PatchEmbed conv: xavier-uniform on the flattened (d, C·P·P) view; bias keeps torch's conv default
        self.patch_embed = L.Dense((P, P, C), (d,), in_axes=("patch", "patch", "channels"), out_axes=("embed",),
                                   use_bias=True, rngs=rngs, kernel_init=L.xavier_uniform(fan, d),
                                   bias_init=L.uniform(1.0 / math.sqrt(fan)), **dt)
        self.cls = L.param(rngs, L.normal(0.02), (1, 1, d), (None, None, "embed"), pd)
        self.mask_token = L.param(rngs, L.normal(0.02), (1, 1, d), (None, None, "embed"), pd)
        table = jnp.asarray(mae_sincos_2d(cfg.grid, d))[None].astype(pd)
        self.pos_embed = FixedTable(table, logical_axes=(None, "tokens", "embed"))
        self.decoder_pos_embed = FixedTable(table, logical_axes=(None, "tokens", "embed"))
        xavier = L.xavier_uniform(d, d)
        self.encoder = Encoder(cfg.encoder_block, CrateBlock, rngs=rngs,
                               block_kwargs=dict(inits=dict(proj=xavier, out=xavier, out_bias=L.zeros)))
        self.norm = L.LayerNorm(d, eps=cfg.final_ln_eps, rngs=rngs, **dt)
        self.decoder_embed = L.Dense((d,), (d,), in_axes=("embed",), out_axes=("mlp",), use_bias=True, rngs=rngs,
                                     kernel_init=xavier, **dt)  # unused, as in the official model
        self.decoder = Encoder(cfg.decoder_block, CrateDecoderBlock, rngs=rngs,
                               block_kwargs=dict(use_softmax=cfg.use_softmax))
        self.decoder_norm = L.LayerNorm(d, eps=cfg.final_ln_eps, rngs=rngs, **dt)
        self.decoder_pred = L.Dense((d,), (fan,), in_axes=("embed",), out_axes=("patch",), use_bias=True, rngs=rngs,
                                    kernel_init=L.xavier_uniform(d, fan), **dt)

    def check_images(self, images) -> None:
        c = self.cfg
        if images.ndim != 4 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
            raise ConfigError(f"images of shape {tuple(images.shape)} do not fit this CRATE-MAE, which expects NHWC "
                              f"[B, {c.image_size}, {c.image_size}, {c.channels}]")

    def encode(self, images, mask=None, *, capture: bool = False):
        """Encoder output `[B, L+1, d]` (after `norm`); `mask` bool `[B, L]` (True = removed), None = keep all.
        With `capture`, returns `(latent, captures)` (per-layer `mssa_w`, `code`, `out`)."""
        self.check_images(images)
        dtype = jnp.dtype(self.cfg.dtype)
        t = self.patch_embed(patchify(images.astype(dtype), self.cfg.patch_size))  # [B, L, d]
        if mask is not None:
            t = jnp.where(mask[..., None], self.mask_token[...].astype(dtype), t)
        cls = jnp.broadcast_to(self.cls[...].astype(dtype), (t.shape[0], 1, t.shape[-1]))
        x = jnp.concatenate([cls, t], axis=1) + self.decoder_pos_embed[...].astype(dtype)
        x, caps = self.encoder(x, capture=capture)
        out = self.norm(x)
        return (out, caps) if capture else out

    def decode(self, latent):
        """Per-patch predictions `[B, L, P²·C]` from the encoder output `[B, L+1, d]`."""
        y, _ = self.decoder(latent)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def __call__(self, images, mask=None, *, train: bool = False, rng=None):
        del train, rng  # no stochastic layers
        return self.decode(self.encode(images, mask))

    def features(self, images) -> jax.Array:
        """The unmasked encoder's cls token (or mean patch token, `cfg.pool`) `[B, d]`, for probes."""
        latent = self.encode(images, None)
        return latent[:, 0] if self.cfg.pool == "cls" else latent[:, 1:].mean(axis=1)


def patch_targets(images, patch: int, norm_pix_loss: bool) -> jax.Array:
    """The official `patchify` of `images` `[B, H, W, C]` -> `[B, L, P²·C]`, optionally normalised per patch
    (`norm_pix_loss`: mean and *unbiased* variance over the patch, `+1e-6`)."""
    x = patchify(images, patch)
    t = x.reshape(x.shape[0], x.shape[1], -1).astype(jnp.float32)
    if norm_pix_loss:
        mean = t.mean(-1, keepdims=True)
        var = jnp.var(t, axis=-1, keepdims=True, ddof=1)
        t = (t - mean) / jnp.sqrt(var + 1e-6)
    return t


def mae_loss(pred, images, mask, *, patch: int, norm_pix_loss: bool) -> jax.Array:
    """Mean over removed patches of the per-patch MSE (docs/math.md §CRATE-MAE `forward_loss`)."""
    target = patch_targets(images, patch, norm_pix_loss)
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_patch * m) / jnp.maximum(jnp.sum(m), 1.0)


def build_mae(cfg: MAEConfig, seed: int | jax.Array = 0) -> CrateMAE:
    """A freshly initialised CRATE-MAE (the constructor of bundle kind 'crate_mae')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return CrateMAE(cfg, rngs=nnx.Rngs(params=key))


def mae_forward_flops(cfg: MAEConfig) -> int:
    """Forward FLOPs per image (matmuls and attention): stem, encoder and decoder blocks on all L+1 tokens,
    prediction head. A decoder block is one d×d synthesis matmul and an MSSA (U, attention, out)."""
    n, d, t = cfg.num_patches, cfg.width, cfg.num_patches + 1
    stem = 2 * n * cfg.patch_dim * d
    blocks = cfg.depth * block_flops(cfg.encoder_block, t)
    decoder = 2 * t * d * d + (2 * t * d * d + 2 * 2 * t * t * d + 2 * t * d * d)
    blocks += (cfg.decoder_depth or cfg.depth) * decoder
    return stem + blocks + 2 * t * d * cfg.patch_dim
