"""The classic DINO loss (Caron et al. 2021; official `facebookresearch/dino`, `main_dino.py`, class `DINOLoss`),
SimDINO's baseline in the same engine (`config.loss.name = 'dino'`).

For student logits `s_v [M, K]` over all views (v < V, the 2 global crops first) and teacher logits of the
global crops `t_g [M, K]` (g < 2), with the running centre `c [K]`:

    q_g  = softmax((t_g − c) / τ_t)        (centred and sharpened; no gradient)
    loss = Σ_{g, v ≠ g} mean_b Σ_k −q_g[b, k] · log_softmax(s_v[b] / τ_s)_k  /  #pairs
    c   ← m_c · c + (1 − m_c) · mean over the teacher's 2M rows of t       (after the step, m_c = 0.9)

`τ_s = 0.1`; the teacher temperature is warmed up linearly *per epoch*, `np.linspace(τ_0, τ_t, E_w)[epoch]`
for the first `E_w` epochs and `τ_t` after (official `teacher_temp_schedule`; DINO's ViT recipes 0.04 → 0.07).
Means are over the global batch (the official code all-reduces the centre; its cross-entropy mean is per
device, whose gradient average over devices is the same thing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_temp_at(step, *, warmup_temp: float, temp: float, warmup_epochs: int, epoch_steps: int):
    """τ_t at `step` (0-based): DINO's per-epoch linear warm-up from `warmup_temp` to `temp` over `warmup_epochs`
    epochs of `epoch_steps` steps, `temp` afterwards."""
    epoch = jnp.asarray(step, jnp.int32) // max(1, int(epoch_steps))
    if warmup_epochs <= 0:
        return jnp.asarray(temp, jnp.float32)
    frac = epoch.astype(jnp.float32) / max(1, warmup_epochs - 1)  # np.linspace endpoints: both reached
    warm = warmup_temp + (temp - warmup_temp) * jnp.minimum(frac, 1.0)
    return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, *, teacher_temp, student_temp: float = 0.1
              ) -> tuple[jax.Array, dict, jax.Array]:
    """`(loss, metrics, batch_center)` for student logits `[V, M, K]` (global views first), teacher logits
    `[G, M, K]` and the centre `[K]` (or `[1, K]`). `batch_center [K]` is the mean teacher logit of this batch,
    for the centre's EMA (`update_center`). Metrics: `teacher_entropy` (mean entropy of `q`, nats; it falls
    towards 0 when the teacher collapses onto one prototype), `teacher_temp`."""
    V, M, K = student.shape
    G = teacher.shape[0]
    if G > V or teacher.shape[1:] != (M, K):
        raise ValueError(f"teacher logits {teacher.shape} do not fit student logits {student.shape}")
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    c = jax.lax.stop_gradient(center.astype(jnp.float32)).reshape(K)
    q = jax.nn.softmax((t - c) / teacher_temp, axis=-1)  # [G, M, K]
    logp = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)  # [V, M, K]
    ce = -jnp.einsum("gmk,vmk->gv", q, logp, precision=jax.lax.Precision.HIGHEST) / M
    pairs = ~jnp.eye(G, V, dtype=bool)  # a teacher view is not compared with the same student view
    loss = jnp.sum(jnp.where(pairs, ce, 0.0)) / (G * V - min(G, V))
    entropy = -jnp.mean(jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1))
    metrics = {"teacher_entropy": entropy, "teacher_temp": jnp.asarray(teacher_temp, jnp.float32)}
    return loss, metrics, jnp.mean(t, axis=(0, 1))


def update_center(center: jax.Array, batch_center: jax.Array, momentum: float = 0.9) -> jax.Array:
    """The centre's EMA after a step: `m · c + (1 − m) · batch_center`."""
    return (momentum * center + (1.0 - momentum) * batch_center.reshape(center.shape)).astype(center.dtype)
