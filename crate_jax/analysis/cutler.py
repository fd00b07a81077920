"""MaskCut as CutLER publishes it (Wang et al., 2023, `maskcut/maskcut.py`), on any feature grid.

`maskcut(features [h, w, d])` returns up to `n_masks` object masks `bool [h, w]`, disjoint, in the order
found. Each round:

1. Patch affinity `A = [cos(f_i, f_j) > tau]`, `eps` (1e-5) elsewhere; `D = diag(A 1)`.
2. The second-smallest generalized eigenvector `x` of `(D − A) x = λ D x` (scipy's `eigh(D − A, D)`,
   CutLER's solver, or an equivalent faster one for large grids: `second_eigenvector`).
3. Bipartition at the mean of `x`; the seed is the patch of largest `|x|`. CutLER flips the bipartition
   when ≥ 3 of the 4 grid corners are foreground or the seed is background; here the sign of `x` is first
   fixed so that the seed is positive (the seed then lies in `x > mean`), which makes the result the same
   for `x` and `−x` (an eigensolver may return either) and equals CutLER's rule for that sign.
4. The 4-connected component of the foreground that holds the seed (`argmax x` after any flip) is the
   object. A mask covering ≤ `min_area` (1 %) of the grid, or whose IoU with the previous round's mask
   exceeds `max_iou` (0.5), is dropped (CutLER keeps an empty mask in its place).
5. The kept object's features are zeroed (CutLER's "painting": the tokens stay in the graph, joined to
   everything with weight `eps`) and the cut repeats. Each mask finally loses the patches of earlier masks.

Callers bring features: for CRATE / CRATE-α the shared `qkv` projection (q = k = v) of a layer, for ViT its
keys, cls token dropped (`crate_jax.analysis.seg_inputs`). Everything is host-side numpy / scipy and a
pure function of the input (deterministic).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.sparse.linalg
from threadpoolctl import threadpool_limits

TAU = 0.15  # CutLER's released pseudo-labels
EPS = 1e-5
N_MASKS = 3
MIN_AREA = 0.01
MAX_IOU = 0.5


def affinity(feats: np.ndarray, tau: float = TAU, eps: float = EPS) -> np.ndarray:
    """`[N, N]` binary cosine graph of `feats [N, d]`: 1 where `cos > tau`, `eps` elsewhere. All-zero rows
    (painted-out tokens) have cosine 0 with everything."""
    f = np.asarray(feats, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return np.where(f @ f.T > tau, 1.0, eps)


def second_eigenvector(A: np.ndarray, solver: str = "auto") -> np.ndarray:
    """Second-smallest generalized eigenvector of `(D − A) x = λ D x`: `[N]` (scale and sign arbitrary).

    Solvers (the same vector up to scale and sign, and to their tolerance):
      'eigh': CutLER's `scipy.linalg.eigh(D − A, D)`, O(N³): 0.6 s at N = 900, about 30 s at N = 3600 (60 × 60).
      'lanczos': `scipy.sparse.linalg.eigsh` for the top two eigenvectors `y` of `D^-½ A D^-½` (eigenvalues
        `1 − λ`), `x = D^-½ y`, from a fixed start vector: about 0.4 s at N = 3600.
      'jax': `jnp.linalg.eigh` of the normalised Laplacian `I − D^-½ A D^-½` on JAX's default device (an
        accelerator), float32.
      'auto': 'eigh' up to N = 1600 (40 × 40 patches), 'lanczos' above.
    BLAS runs single-threaded: for patch graphs threads only add overhead, and on a busy host OpenBLAS
    spin-waits far longer than the solve.
    """
    n = A.shape[0]
    if solver == "auto":
        solver = "eigh" if n <= 1600 else "lanczos"
    d = A.sum(axis=1)
    if solver == "eigh":
        with threadpool_limits(limits=1, user_api="blas"):
            _, vec = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 1])
        return vec[:, 0]
    s = 1.0 / np.sqrt(d)
    M = A * s[:, None] * s[None, :]
    if solver == "lanczos":
        v0 = np.sqrt(d) * (1.0 + 0.01 * np.cos(np.arange(n)))  # fixed start: deterministic
        with threadpool_limits(limits=1, user_api="blas"):
            w, v = scipy.sparse.linalg.eigsh(M, k=2, which="LA", v0=v0, tol=1e-10)
        return v[:, int(np.argmin(w))] * s
    if solver == "jax":
        import jax.numpy as jnp

        _, v = jnp.linalg.eigh(jnp.eye(n, dtype=jnp.float32) - jnp.asarray(M, jnp.float32))
        return np.asarray(v[:, 1], np.float64) * s
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


SOLVERS = ("auto", "eigh", "lanczos", "jax")


def corner_count(mask: np.ndarray) -> int:
    """How many of the four corners of `mask [h, w]` are foreground."""
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def bipartition(x: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """`(foreground bool [h, w], seed index)` from an eigenvector `x [h·w]` by the rules of step 3; the same
    for `x` and `−x`."""
    x = np.asarray(x, np.float64)
    peak = int(np.argmax(np.abs(x)))
    if x[peak] < 0:  # fix the sign: the most confident patch on the positive side
        x = -x
    fg = x > x.mean()
    if corner_count(fg.reshape(shape)) >= 3:  # the foreground holds the image's corners: it is background
        x, fg = -x, ~fg
    return fg.reshape(shape), int(np.argmax(x))


def seed_component(fg: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of `fg [h, w]` holding flat index `seed` (empty if the seed is background)."""
    labels, _ = scipy.ndimage.label(fg)
    lab = labels.reshape(-1)[seed]
    return np.zeros_like(fg) if lab == 0 else labels == lab


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def maskcut(features: np.ndarray, *, n_masks: int = N_MASKS, tau: float = TAU, eps: float = EPS,
            min_area: float = MIN_AREA, max_iou: float = MAX_IOU, solver: str = "auto") -> list[np.ndarray]:
    """Up to `n_masks` object masks from a feature grid (module docstring).

    Args:
      features: `[h, w, d]` patch features (no cls token), any model's.
      n_masks: rounds of cutting (CutLER: 3).
      tau: cosine threshold of an edge (CutLER: 0.15).
      min_area, max_iou: the drop rules of step 4.
      solver: the eigensolver (`second_eigenvector`).
    Returns:
      list of non-empty, disjoint `bool [h, w]` masks in the order found (dropped rounds leave no entry).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 3 or min(features.shape) < 1:
        raise ValueError(f"features must be a grid [h, w, d], got shape {features.shape}")
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    h, w, d = features.shape
    if h * w < 2:
        return []
    feats = features.reshape(h * w, d).copy()
    painted = np.zeros((h, w), bool)
    previous = np.zeros((h, w), bool)
    found = []
    for i in range(n_masks):
        x = second_eigenvector(affinity(feats, tau, eps), solver)
        fg, seed = bipartition(x, (h, w))
        obj = seed_component(fg, seed)
        if i >= 1 and (mask_iou(previous, obj) > max_iou or obj.mean() <= min_area):
            obj = np.zeros_like(obj)
        previous = obj
        painted |= obj
        feats[painted.reshape(-1)] = 0.0
        found.append(obj)
    out, taken = [], np.zeros((h, w), bool)
    for obj in found:
        keep = obj & ~taken
        taken |= obj
        if keep.any():
            out.append(keep)
    return out


def upsample(mask: np.ndarray, patch: int) -> np.ndarray:
    """Nearest-neighbour upsampling of `[h, w]` patch masks to pixels `[h·P, w·P]`."""
    return np.repeat(np.repeat(np.asarray(mask), patch, axis=0), patch, axis=1)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to `[height, width]` (back to the original image)."""
    from PIL import Image

    mask = np.asarray(mask, bool)
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
