"""The SimDINO loss (Wu et al. 2025, "Simplifying DINO via Coding Rate Regularization", arXiv 2502.10385;
official code `RobinWu218/SimDINO`, `simdino/main_dino.py`, class `MCRLoss`), over the global batch.

For student views `s_v [M, p]` (v < V; the first two are the global crops) and teacher global views
`t_g [M, p]` (g < 2), all L2-normalised head outputs of the `M` images of the *global* batch:

    comp  = Σ_{g, v ≠ g} mean_b cos(t_g[b], s_v[b]) / (2V − 2)                 (official `calc_compression`)
    Z_g   = (s_g + t_g) / 2   (expa_type=1, the official default)   or   s_g   (expa_type=0)
    R     = mean_g ½ logdet(I_p + p/(M ε²) Z_gᵀ Z_g)                           (official `calc_expansion`)
    loss  = −coeff · comp − γ · R,     γ = (p + M)/(p M)  (the official "balancing factor gamma")

`ε²` is the official `--eps` argument, which the code uses *as* ε² (`scalar = p / (m·N·eps)`); its default
is 0.5 and the README's ImageNet command passes `--eps 0.05`. The paper's own text could not be read
from this workplace, so ε and γ are as the code defines them.

**Global batch.** The official code computes `Z_gᵀ Z_g` per device and scales it by the *global* count
`m·N` unless `--reduce_cov 1` all-reduces it: with the default, every device's rate sees only its own `m`
rows, which is what collapses small per-device batches. Here `Z` is the global `jax.Array` (rows sharded
over data × fsdp); `Zᵀ Z` written with plain `jnp` makes XLA insert the reduction, so the value equals a
one-device run on any mesh (the official `--reduce_cov 1` semantics).

**logdet.** Through a Cholesky factor of `A = I + α ZᵀZ` (`α = p/(Mε²)`), the Gram at `HIGHEST` precision
and symmetrised. Every eigenvalue of `A` is ≥ 1, and with unit-norm rows `λ_max(A) ≤ 1 + α·M = 1 + p/ε²`, so
`cond(A) ≤ 1 + p/ε²` whatever the rank of `Z` (a collapsed, rank-1 or all-zero batch included): the float32
factorisation cannot break down for `p/ε² ≪ 1/u ≈ 1.7e7` (`check_conditioning` enforces a 1e6 margin).
`logdet_dtype='float64'` computes the rate in float64 on the host (`coding_rate`), for runs that want the
extra digits: float32 loses about `u·cond(A)` relative in the rate (measured 1.3e-5 at p/ε² = 5120, mostly
from rounding the Gram itself), float64 about 1e-9. It moves the `[M, p]` rows to one host each step, so
it suits single-host runs; it was not tried across hosts.
The official NaNs come from fp16 autocast of the covariance and `cholesky_ex` silently returning a failed
factor; neither can happen here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models.heads import l2_normalize

HIGHEST = jax.lax.Precision.HIGHEST
LOGDET_DTYPES = ("float32", "float64")
MAX_FLOAT32_CONDITION = 1e6


def check_conditioning(dim: int, eps_sq: float, logdet_dtype: str) -> None:
    """Refuses ε² so small that float32 Cholesky could lose its pivots (cond(A) ≤ 1 + p/ε², module doc)."""
    if logdet_dtype == "float32" and 1.0 + dim / eps_sq > MAX_FLOAT32_CONDITION:
        raise ValueError(f"the coding-rate matrix can reach condition number 1 + p/ε² = {1 + dim / eps_sq:.3g} "
                         f"(p = {dim}, ε² = {eps_sq}), too close to float32's limit; raise ε² or use "
                         f"logdet_dtype='float64'")


def _host_rate_and_grad(Z, alpha):
    """`½ logdet(I + α ZᵀZ)` and its gradient `α Z (I + α ZᵀZ)⁻¹` w.r.t. `Z`, all in float64."""
    z = np.asarray(Z, np.float64)
    a = np.eye(z.shape[1]) + float(alpha) * (z.T @ z)
    chol = np.linalg.cholesky(a)
    inv_l = np.linalg.solve(chol, np.eye(a.shape[0]))
    return np.float32(np.sum(np.log(np.diag(chol)))), (float(alpha) * z @ (inv_l.T @ inv_l)).astype(np.float32)


def _callback(Z, alpha):
    shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(Z.shape, jnp.float32))
    return jax.pure_callback(_host_rate_and_grad, shapes, Z, alpha)


@jax.custom_vjp
def _rate_f64(Z: jax.Array, alpha: jax.Array) -> jax.Array:
    return _callback(Z, alpha)[0]


def _f64_fwd(Z, alpha):
    value, dZ = _callback(Z, alpha)
    return value, (dZ, jnp.zeros_like(alpha))


def _f64_bwd(res, g):
    dZ, zero_alpha = res
    return g * dZ, zero_alpha  # α = p / (M ε²) is a constant of the loss


_rate_f64.defvjp(_f64_fwd, _f64_bwd)


def coding_rate(Z: jax.Array, eps_sq: float, logdet_dtype: str = "float32") -> jax.Array:
    """`R(Z) = ½ logdet(I_p + p/(M ε²) ZᵀZ)` for the global rows `Z [M, p]`.

    float32: the `p × p` Gram on device (`HIGHEST`, symmetrised; XLA reduces it over the batch shards), then
    Cholesky. float64: `Z` is handed to the host (`jax.pure_callback`, i.e. gathered to one process), which
    forms the Gram, factorises it and returns the value and `∂R/∂Z = α Z (I + α ZᵀZ)⁻¹` in float64."""
    M, p = Z.shape
    Z = Z.astype(jnp.float32)
    alpha = p / (M * eps_sq)
    if logdet_dtype == "float64":
        return _rate_f64(Z, jnp.asarray(alpha, jnp.float32))
    if logdet_dtype != "float32":
        raise ValueError(f"logdet_dtype: got {logdet_dtype!r}, expected one of {LOGDET_DTYPES}")
    gram = jnp.einsum("mi,mj->ij", Z, Z, precision=HIGHEST)
    a = jnp.eye(p, dtype=jnp.float32) + alpha * 0.5 * (gram + gram.T)
    return jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(a))))


def official_gamma(dim: int, batch: int) -> float:
    """The official balancing factor `γ = (p + M)/(p M)` (`(p+N*m)/(p*N*m)` with the global batch `M = N m`)."""
    return (dim + batch) / (dim * batch)


def simdino_loss(student: jax.Array, teacher: jax.Array, *, eps_sq: float, gamma: float | None = None,
                 coeff: float = 1.0, expa_type: int = 1, logdet_dtype: str = "float32") -> tuple[jax.Array, dict]:
    """`(loss, metrics)` for student views `[V, M, p]` (global views first) and teacher global views `[G, M, p]`
    (gradients stop at the teacher). Metrics: `comp` (mean cosine), `rate` (mean ½ logdet), `expa` (γ·rate)."""
    V, M, p = student.shape
    G = teacher.shape[0]
    if G > V or teacher.shape[1:] != (M, p):
        raise ValueError(f"teacher views {teacher.shape} do not fit student views {student.shape}")
    s = l2_normalize(student)
    t = l2_normalize(jax.lax.stop_gradient(teacher))
    sim = jnp.einsum("gbp,vbp->gv", t, s, precision=HIGHEST) / M  # mean over the global batch
    same = jnp.eye(G, V, dtype=bool)  # a teacher view is not compared with the same student view
    comp = jnp.sum(jnp.where(same, 0.0, sim)) / (G * V - min(G, V))
    if expa_type == 1:
        Z = (s[:G] + t) / 2
    elif expa_type == 0:
        Z = s[:G]
    else:
        raise ValueError(f"expa_type: got {expa_type!r}, expected 0 (student global views) or 1 (their mean with "
                         f"the teacher's)")
    rate = jnp.mean(jnp.stack([coding_rate(Z[g], eps_sq, logdet_dtype) for g in range(G)]))
    gam = official_gamma(p, M) if gamma is None else float(gamma)
    expa = gam * rate
    loss = -coeff * comp - expa
    return loss, {"comp": comp, "rate": rate, "expa": expa}
