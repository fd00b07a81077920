"""Analytic forward FLOPs per image (a multiply-add counts 2), the count MFU is reported against."""

from __future__ import annotations

from crate_jax.models.config import BlockConfig, ModelConfig


def block_flops(cfg: BlockConfig, tokens: int) -> int:
    """FLOPs of one encoder block on `tokens` tokens (matmuls and attention only)."""
    T, d = tokens, cfg.width
    attn = 2 * 2 * T * T * d  # w wᵀ and A w over all heads
    if cfg.family == "crate":
        return 2 * T * d * d + attn + 2 * T * d * d + 3 * 2 * T * d * d  # U, attention, out, ISTA (3 d×d matmuls)
    if cfg.family == "crate_alpha":
        m = cfg.dict_size
        odl = 2 * T * d * m + (cfg.odl_steps - 1) * 4 * T * d * m + 2 * T * d * m  # first step, later steps, D1 decode
        return 2 * T * d * d + attn + 2 * T * d * d + odl
    return 3 * 2 * T * d * d + attn + 2 * T * d * d + 2 * 2 * T * d * cfg.mlp_dim


def forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs for one image at `cfg.image_size`."""
    n, d = cfg.num_patches, cfg.width
    stem = 2 * n * cfg.patch_size ** 2 * cfg.channels * d
    head = 2 * d * cfg.num_classes
    return stem + cfg.depth * block_flops(cfg.block, n + 1) + head


def train_flops(cfg: ModelConfig) -> int:
    """Forward + backward ≈ 3 × forward (the usual MFU convention; remat recompute is not counted)."""
    return 3 * forward_flops(cfg)
