"""Coding rate, compression term and sparsity (docs/math.md §Coding rate), in JAX, batched over any leading axes.

Tokens are rows: `Z [..., N, d]` (the papers' `Z ∈ R^{d×N}` transposed). Two forms:

* **Paper form** (the definitions): `R(Z; ε) = ½ logdet(I_d + d/(Nε²) ZᵀZ)` and
  `R^c(Z; U_[K]) = Σ_k ½ logdet(I_p + p/(Nε²) (Z U_k)ᵀ(Z U_k))` with `U_k [d, p]`; sparsity `‖Z‖₀ / size`.
* **Official measurement form** (CRATE's `vis_utils`): the MSSA projections `X = LN1(Z^ℓ) U` of a layer,
  every token's p-vector scaled to unit norm, `R_b = ½ Σ_k logdet(I_N + p/(N·eps_sq) X_k X_kᵀ)` with
  `eps_sq = 0.01` in the place of ε²; sparsity as the per-sample fraction of exact zeros.

`logdet(I + a XᵀX) = logdet(I + a X Xᵀ)` (Sylvester), so every rate is computed on the smaller Gram
matrix (`min(N, p)` or `min(N, d)` square) with a Cholesky factorisation, in the input's dtype (at least
float32); the Gram products run at `Precision.HIGHEST` so GPUs do not drop to TF32.

Precision: the Cholesky factor of `I + a G` carries an absolute error of about `u·(1 + a λ_max(G))` per
pivot (`u` the unit roundoff), so in float32 the rate of a low-rank, large-norm token set (condition number
≳ 1e7, e.g. a long residual stream at small ε) is off by O(1) nats or NaN. `crate_jax.analysis.measure`
therefore runs these functions on float64 inputs under `jax.enable_x64` by default; float32 agrees with
float64 to ~1e-6 relative on well-conditioned inputs (unit-normalised official form, ε² = 0.01).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def half_logdet_eye_plus_gram(X: jax.Array, alpha) -> jax.Array:
    """`½ logdet(I + α XᵀX)` for `X [..., N, q]` (equal to `½ logdet(I + α X Xᵀ)`), returns `[...]`.

    The Gram matrix is formed on the smaller side (`q × q` when `q <= N`, else `N × N`) in float32 or wider.
    `alpha` is a scalar or broadcasts against `[...]`.
    """
    X = X.astype(jnp.promote_types(X.dtype, jnp.float32))
    n, q = X.shape[-2:]
    if q <= n:
        gram = jnp.einsum("...ni,...nj->...ij", X, X, precision=HIGHEST)
    else:
        gram = jnp.einsum("...in,...jn->...ij", X, X, precision=HIGHEST)
    m = gram.shape[-1]
    alpha = jnp.asarray(alpha, X.dtype)[..., None, None]
    chol = jnp.linalg.cholesky(jnp.eye(m, dtype=X.dtype) + alpha * gram)
    return jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)  # ½·(2 Σ log L_ii)


def coding_rate(Z: jax.Array, eps: float) -> jax.Array:
    """Paper form `R(Z; ε) = ½ logdet(I_d + d/(Nε²) ZᵀZ)` for `Z [..., N, d]` (tokens as rows) -> `[...]`."""
    n, d = Z.shape[-2:]
    return half_logdet_eye_plus_gram(Z, d / (n * eps**2))


def compression_rate(Z: jax.Array, U: jax.Array, eps: float) -> jax.Array:
    """Paper form `R^c(Z; U_[K]) = Σ_k R(Z U_k; ε)` with `R` at dimension p.

    Args:
      Z: `[..., N, d]` tokens as rows.
      U: `[d, K, p]` (a layer's MSSA `proj.kernel`; `U_k = U[:, k, :]`).
      eps: the distortion ε.
    Returns:
      `[...]`.
    """
    dt = jnp.promote_types(jnp.result_type(Z, U), jnp.float32)
    W = jnp.einsum("...nd,dkp->...knp", Z.astype(dt), U.astype(dt), precision=HIGHEST)
    return compression_from_projections(W, eps)


def compression_from_projections(W: jax.Array, eps: float) -> jax.Array:
    """Paper form `Σ_k ½ logdet(I_p + p/(Nε²) W_kᵀW_k)` from projections `W [..., K, N, p]` -> `[...]`."""
    n, p = W.shape[-2:]
    return jnp.sum(half_logdet_eye_plus_gram(W, p / (n * eps**2)), axis=-1)


def unit_normalize(X: jax.Array, axis: int = -1, floor: float = 1e-12) -> jax.Array:
    """`X / max(‖X‖, floor)` along `axis` (torch `F.normalize`)."""
    X = X.astype(jnp.promote_types(X.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(jnp.square(X), axis=axis, keepdims=True))
    return X / jnp.maximum(norm, floor)


def official_compression(X: jax.Array, eps_sq: float = 0.01) -> jax.Array:
    """Official measurement: per-sample `R_b = ½ Σ_k logdet(I_N + p/(N·eps_sq) X̂_bk X̂_bkᵀ)` (docs/math.md).

    Args:
      X: `[B, N, K, p]`, a layer's MSSA projections `LN1(Z^ℓ) U` in the model's own layout (all N tokens,
        cls included), as captured in `caps['mssa_w'][ℓ]`.
      eps_sq: the constant in the place of ε² (0.01 in the official code).
    Returns:
      `[B]` float32; aggregate with `mean_and_std(..., ddof=1)` for the official (mean, std).
    """
    Xh = unit_normalize(X, axis=-1)
    n, p = X.shape[-3], X.shape[-1]
    Xh = jnp.swapaxes(Xh, -3, -2)  # [B, K, N, p]
    return jnp.sum(half_logdet_eye_plus_gram(Xh, p / (n * eps_sq)), axis=-1)


def zero_fraction(Z: jax.Array, batch_axes: int = 1) -> jax.Array:
    """Per-sample fraction of exact zeros over every axis after the first `batch_axes` (official sparsity)."""
    axes = tuple(range(batch_axes, Z.ndim))
    return jnp.mean((Z == 0).astype(jnp.float32), axis=axes)


def nonzero_fraction(Z: jax.Array, batch_axes: int = 1) -> jax.Array:
    """Per-sample `‖Z‖₀ / size` over every axis after the first `batch_axes` (paper sparsity; what the official
    plot draws as `1 − zero_fraction`). Lower is sparser."""
    axes = tuple(range(batch_axes, Z.ndim))
    return jnp.mean((Z != 0).astype(jnp.float32), axis=axes)
