"""Position-embedding tables and their resampling (docs/math.md §Position tables)."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import scipy.ndimage


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0, dtype=jnp.float32) -> jax.Array:
    """big_vision `posemb_sincos_2d`: `[h*w, width]`, per token `[sin(cω), cos(cω), sin(rω), cos(rω)]`
    with `ω_i = temperature^(−i/(width/4 − 1))`, column c and row r, tokens row-major."""
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    rows, cols = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
    r = rows.reshape(-1)[:, None] * omega[None]
    c = cols.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(c), jnp.cos(c), jnp.sin(r), jnp.cos(r)], axis=1).astype(dtype)


def sincos_2d_with_cls(grid: int, width: int, dtype=jnp.float32) -> jax.Array:
    """`[1, 1 + grid², width]`: the sincos table with the zero row for the cls token."""
    table = sincos_2d(grid, grid, width, dtype=dtype)
    return jnp.concatenate([jnp.zeros((1, width), dtype), table], axis=0)[None]


def resample_2d(pos, new_grid: int) -> np.ndarray:
    """Resamples a `[1, 1 + g², d]` table to `[1, 1 + new_grid², d]` on the 2-D grid, cls row kept
    (big_vision `crate.load`: `scipy.ndimage.zoom(order=1)`)."""
    pos = np.asarray(pos)
    n = pos.shape[1] - 1
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise ValueError(f"position embedding has {n} patch rows, not a square grid")
    if g == new_grid:
        return pos
    grid = pos[0, 1:].reshape(g, g, -1)
    zoom = (new_grid / g, new_grid / g, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return np.concatenate([pos[:, :1], grid.reshape(1, new_grid * new_grid, -1)], axis=1)


def resample_1d(pos, new_len: int) -> np.ndarray:
    """CLIPA's fine-tuning resize (docs/math.md §Position tables): linear interpolation along the flattened token axis,
    cls row included (`jax.image.resize(..., 'bilinear')` on `[1, L, d]`)."""
    pos = jnp.asarray(pos)
    return np.asarray(jax.image.resize(pos, (1, new_len, pos.shape[-1]), "bilinear"))


def resize_patch_kernel(kernel, new_patch: int) -> np.ndarray:
    """Bilinear resize of a conv patch kernel `[P, P, C, d] -> [P', P', C, d]` (docs/math.md §Position tables)."""
    kernel = jnp.asarray(kernel)
    if kernel.shape[0] == new_patch:
        return np.asarray(kernel)
    return np.asarray(jax.image.resize(kernel, (new_patch, new_patch) + kernel.shape[2:], "bilinear"))


def torch_bicubic_matrix(size: int, scale_factor: float) -> np.ndarray:
    """`[floor(size·scale_factor), size]`: torch `interpolate(mode='bicubic', align_corners=False)` along one
    axis with an explicit `scale_factor`, as a matrix. Source of output i: `(i + ½)/scale_factor − ½`;
    Keys' cubic with a = −0.75 over the 4 neighbours, indices clamped to the edge; no antialiasing."""
    a = -0.75
    out = int(np.floor(size * scale_factor))
    m = np.zeros((out, size))
    for i in range(out):
        src = (i + 0.5) / scale_factor - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        w = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
             ((a + 2) * t - (a + 3)) * t * t + 1,
             ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1]
        w.append(1.0 - sum(w))
        for k, wk in enumerate(w):
            m[i, min(max(x0 - 1 + k, 0), size - 1)] += wk
    return m


def resample_dino(patches: jax.Array, new_grid: int) -> jax.Array:
    """DINO / SimDINO `interpolate_pos_encoding` for a `[g, g, d]` grid of patch rows -> `[new_grid, new_grid, d]`:
    torch bicubic with the scale factor `(new_grid + 0.1) / g` (the official code adds 0.1 against rounding)."""
    g = patches.shape[0]
    m = torch_bicubic_matrix(g, (new_grid + 0.1) / g)
    if m.shape[0] != new_grid:
        raise ValueError(f"cannot resample a {g}x{g} position grid to {new_grid}x{new_grid}")
    m = jnp.asarray(m, jnp.float32)
    return jnp.einsum("ai,bj,ijd->abd", m, m, patches.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
