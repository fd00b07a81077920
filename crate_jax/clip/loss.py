"""Image-text losses over the **global** batch, computed one device's rows at a time (docs/math.md §Contrastive loss).

`zimg, ztxt [B, E]` are the L2-normalised embeddings of the whole global batch, sharded on the
batch axis over the mesh axes (`data`, `fsdp`). Each device all-gathers both towers' embeddings,
then computes only its own `b = B / n` rows against all `B` columns (CLIPA's `local_loss`): the
logit memory is `[b, B]` per device instead of `[B, B]`, and the value equals the full-batch loss.

* `contrastive_loss`: `logits = zimg ztxtᵀ · t`,
  `loss = mean_i ½(−log softmax_row(logits)_ii − log softmax_col(logits)_ii)`.
  Column `j` of the full matrix is text `j` against every image, so a device gets its columns
  from its own texts against the gathered images; the positive of local row `i` is `i + rank·b`.
* `sigmoid_loss` (SigLIP): `−1/B Σ_ij log σ(l_ij (t ⟨zimg_i, ztxt_j⟩ + b))`, `l_ii = 1`, else −1.

Without a mesh (or with one device on the batch axes) the same code runs on the whole batch.
Gradients flow through the all-gathers (their transpose is a reduce-scatter), so both towers get
the gradient of the global loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def _batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
    if mesh is None:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def _rows_softmax(zi, zt, zi_all, zt_all, t, bias, offset):
    """Loss terms and metrics of `b` local rows. `zi, zt [b, E]` local, `zi_all, zt_all [B, E]`."""
    del bias
    b = zi.shape[0]
    pos = offset + jnp.arange(b)
    i2t = (zi @ zt_all.T) * t  # [b, B]: rows of the full logit matrix
    t2i = (zt @ zi_all.T) * t  # [b, B]: columns of the full logit matrix
    lp_i2t = jax.nn.log_softmax(i2t, axis=-1)[jnp.arange(b), pos]
    lp_t2i = jax.nn.log_softmax(t2i, axis=-1)[jnp.arange(b), pos]
    loss_sum = jnp.sum(-0.5 * (lp_i2t + lp_t2i))
    correct = {"i2t_top1": jnp.sum(jnp.argmax(i2t, -1) == pos), "t2i_top1": jnp.sum(jnp.argmax(t2i, -1) == pos)}
    return loss_sum, correct


def _rows_sigmoid(zi, zt, zi_all, zt_all, t, bias, offset):
    b, B = zi.shape[0], zt_all.shape[0]
    pos = offset + jnp.arange(b)
    logits = (zi @ zt_all.T) * t + bias  # [b, B]
    labels = jnp.where(jnp.arange(B)[None, :] == pos[:, None], 1.0, -1.0)
    loss_sum = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    t2i = zt @ zi_all.T  # metrics only (argmax has no gradient)
    correct = {"i2t_top1": jnp.sum(jnp.argmax(logits, -1) == pos), "t2i_top1": jnp.sum(jnp.argmax(t2i, -1) == pos)}
    return loss_sum, correct


def _global_loss(kind: str, zimg, ztxt, t, bias, mesh: Mesh | None):
    """`(loss, {'i2t_top1', 't2i_top1'})`, means over the global batch."""
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    t = jnp.asarray(t, jnp.float32).reshape(())
    bias = jnp.asarray(0.0 if bias is None else bias, jnp.float32).reshape(())
    B = zimg.shape[0]
    if zimg.shape != ztxt.shape or zimg.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [B, E], got {zimg.shape} and {ztxt.shape}")
    rows = _rows_softmax if kind == "softmax" else _rows_sigmoid
    axes = _batch_axes(mesh)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if n == 1:
        loss_sum, correct = rows(zimg, ztxt, zimg, ztxt, t, bias, 0)
        return loss_sum / B, {k: v / B for k, v in correct.items()}
    if B % n:
        raise ValueError(f"global batch {B} is not divisible by the {n} devices on mesh axes {axes}")

    def local(zi, zt, t, bias):
        zi_all = jax.lax.all_gather(zi, axes, axis=0, tiled=True)  # [B, E], blocks in rank order
        zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
        offset = jax.lax.axis_index(axes) * zi.shape[0]
        loss_sum, correct = rows(zi, zt, zi_all, zt_all, t, bias, offset)
        total = jax.lax.psum(loss_sum, axes)
        return total / B, {k: jax.lax.psum(v, axes) / B for k, v in correct.items()}

    spec = P(axes, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()),
                       out_specs=(P(), {"i2t_top1": P(), "t2i_top1": P()}), axis_names=frozenset(axes))
    return fn(zimg, ztxt, t, bias)


def contrastive_loss(zimg, ztxt, t, *, mesh: Mesh | None = None):
    """Bidirectional softmax contrastive loss over the global batch.

    Args:
      zimg, ztxt: `[B, E]` normalised embeddings (global arrays, batch-sharded or not).
      t: the logit multiplier `exp(params['t'])` (scalar or shape (1,)).
      mesh: the device mesh; rows are computed per device over its (`data`, `fsdp`) block.
    Returns:
      `(loss, metrics)`; metrics `i2t_top1`, `t2i_top1` are the fractions of rows (columns) whose
      argmax is the positive.
    """
    return _global_loss("softmax", zimg, ztxt, t, None, mesh)


def sigmoid_loss(zimg, ztxt, t, bias, *, mesh: Mesh | None = None):
    """SigLIP loss `−1/B Σ_ij log σ(l_ij (t zimg_i·ztxt_j + bias))` over the global batch; see
    `contrastive_loss` for the arguments."""
    return _global_loss("sigmoid", zimg, ztxt, t, bias, mesh)


def full_batch_logits(zimg, ztxt, t):
    """`[B, B]` logits `zimg ztxtᵀ · t` (for evaluation and tests; training never builds it)."""
    return (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T) * jnp.asarray(t, jnp.float32).reshape(())
