"""On-device mixup / cutmix (docs/vision.md §Recipes): each step picks one of the two with probability ½; the
partner of example i is the reversed batch; mixup λ ~ Beta(α_m, α_m), cutmix λ ~ Beta(α_c, α_c)
with a box of area (1 − λ) and λ recomputed from the clipped box."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup_cutmix(key, images, labels, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5):
    """`images [B, H, W, C]`, soft `labels [B, K]` -> mixed images and labels."""
    k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 5)
    partner_img, partner_lab = images[::-1], labels[::-1]
    B, H, W, _ = images.shape

    lam_m = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    mixed = lam_m * images + (1 - lam_m) * partner_img

    lam_c = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    cut = jnp.sqrt(1.0 - lam_c)
    ch, cw = (cut * H).astype(jnp.int32), (cut * W).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, H)
    cx = jax.random.randint(k_x, (), 0, W)
    y0, y1 = jnp.clip(cy - ch // 2, 0, H), jnp.clip(cy + ch // 2, 0, H)
    x0, x1 = jnp.clip(cx - cw // 2, 0, W), jnp.clip(cx + cw // 2, 0, W)
    rows, cols = jnp.arange(H)[:, None], jnp.arange(W)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    cutmixed = jnp.where(box, partner_img, images)
    lam_c = 1.0 - ((y1 - y0) * (x1 - x0)) / (H * W)

    use_mixup = jax.random.uniform(k_switch) < switch_prob
    lam = jnp.where(use_mixup, lam_m, lam_c).astype(labels.dtype)
    out = jnp.where(use_mixup, mixed, cutmixed).astype(images.dtype)
    return out, lam * labels + (1 - lam) * partner_lab
