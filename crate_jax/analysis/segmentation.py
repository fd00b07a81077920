"""Emergent segmentation from patch features and attention (host-side numpy / scipy).

Patch quantities are per image and row-major over the `g × g` patch grid, as the model orders its
tokens: `attn [K, N]`, `feats [N, F]`, `N = g²`.

* `threshold_attention`: DINO-style coarse masks, per head the smallest set of patches holding a
  fraction `mass` of the cls token's attention.
* `pca_rgb`: the first three principal components of the patch features as an RGB picture.
* `maskcut`: MaskCut (Wang et al., 2023) as CutLER publishes it, on `[N, F]` patch features:
  `crate_jax.analysis.cutler.maskcut` on the `g × g` grid (see there for the algorithm).
"""

from __future__ import annotations

import numpy as np


def grid_size(num_patches: int) -> int:
    """`g` with `g² = N`; raises for non-square token counts."""
    g = int(round(np.sqrt(num_patches)))
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return g


def threshold_attention(attn: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """Per head, the patches with the largest attention that together hold `mass` of it.

    Args:
      attn: `[K, N]` non-negative (the cls row over patches).
      mass: fraction of each head's attention to keep, in (0, 1].
    Returns:
      `bool [K, N]`.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    attn = np.asarray(attn, np.float64)
    order = np.argsort(-attn, axis=-1)
    sorted_attn = np.take_along_axis(attn, order, axis=-1)
    cum = np.cumsum(sorted_attn, axis=-1) / np.maximum(sorted_attn.sum(-1, keepdims=True), 1e-30)
    # keep a patch if the mass before it is still short of `mass` (so the patch that crosses it is kept)
    keep_sorted = (cum - sorted_attn / np.maximum(sorted_attn.sum(-1, keepdims=True), 1e-30)) < mass
    masks = np.zeros_like(keep_sorted)
    np.put_along_axis(masks, order, keep_sorted, axis=-1)
    return masks


def pca_rgb(feats: np.ndarray, grid: int | None = None) -> np.ndarray:
    """The first three principal components of `feats [N, F]`, each min-max scaled to [0, 1]: `[g, g, 3]`."""
    feats = np.asarray(feats, np.float64)
    n = feats.shape[0]
    g = grid or grid_size(n)
    centred = feats - feats.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    comps = u[:, :3] * s[:3]
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0, keepdims=True), comps.max(0, keepdims=True)
    rgb = (comps - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return rgb.reshape(g, g, 3)


def maskcut(feats: np.ndarray, num_objects: int = 3, *, tau: float = 0.2, grid: int | None = None,
            eps: float = 1e-5) -> list[np.ndarray]:
    """Up to `num_objects` object masks from patch features by CutLER's MaskCut (`cutler.maskcut`).

    Args:
      feats: `[N, F]` patch features (no cls token), row-major over the `g × g` grid.
      num_objects: how many cuts to make.
      tau: cosine-similarity threshold for an edge.
    Returns:
      list of `bool [g, g]` masks, disjoint, in the order found.
    """
    from crate_jax.analysis import cutler

    feats = np.asarray(feats, np.float64)
    g = grid or grid_size(feats.shape[0])
    return cutler.maskcut(feats.reshape(g, g, -1), n_masks=num_objects, tau=tau, eps=eps)


def upsample(grid_map: np.ndarray, patch: int) -> np.ndarray:
    """Nearest-neighbour upsampling of `[..., g, g]` patch maps to pixels `[..., g·P, g·P]`."""
    return np.repeat(np.repeat(grid_map, patch, axis=-2), patch, axis=-1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
