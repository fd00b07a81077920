"""Fused softmax attention on TPU: the Pallas flash-attention kernel that ships with JAX
(`jax.experimental.pallas.ops.tpu.flash_attention`), run per device under `jax.shard_map`.

The explicit form writes every head's `[T, S]` score matrix to HBM in float32 and reads it back for the
softmax, the weighted sum and all three in the backward pass; for the memory-bound recipes (CRATE-MAE,
SimDINO, the 1,024-token LM) those matrices carried a third to a half of a step's HBM bytes on a TPU
slice (bench/RESULTS.md, "A plan per recipe"). The kernel keeps each block's scores in VMEM and saves only
the softmax's row statistics for the backward pass. Measured, that pays only for long causal sequences; for
the 197-token steps it moves more bytes than it saves (`worth_it`). MSSA, whose query, key and value are one
tensor, uses its own kernel up to 1,024 tokens (`tpu_mssa`), which beats this one there too; this kernel
serves standard attention and longer sequences.

The kernel wants `[B, K, T, p]` with `T` and `S` multiples of its 128-row blocks: shorter or ragged
sequences (e.g. 520 tokens) are zero-padded at the end and the padding is kept out of every real
token's softmax with segment ids (real tokens segment 1, padding segment 0). A custom call cannot be split
by XLA's partitioner (it would gather the whole batch onto every chip), so the kernel runs under
`shard_map` over the step's mesh: batch over (`data`, `fsdp`), heads over `tensor`, where they divide.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

BLOCK = 128  # the kernel's default block along both sequence axes (its kv blocks must be multiples of 128)
MIN_TOKENS = 512  # shorter causal sequences, and all non-causal ones, keep the explicit form (`worth_it`)


def on_tpu(mesh: Mesh | None) -> bool:
    """Whether the kernel can run here: a step traced for a mesh of TPU chips (an AOT topology's included),
    or, with no mesh, a single TPU chip. Without a mesh nothing says how the arrays are split, and XLA would
    gather a custom call's operands onto every chip; such code (evaluations on a multi-chip slice) keeps the
    explicit form."""
    if mesh is not None:
        return mesh.devices.flat[0].platform == "tpu"
    return jax.default_backend() == "tpu" and jax.device_count() == 1


def worth_it(t: int, s: int, causal: bool) -> bool:
    """Whether the kernel pays for itself: causal attention over at least `MIN_TOKENS` tokens.

    The kernel trades bytes for FLOPs. Its backward pass recomputes the scores (7 matmuls per head against
    the explicit form's 4); it saves two float32 row statistics per query and head, each 128 lanes wide (as
    many bytes as a float32 score row over 256 keys); it pads ragged lengths to whole blocks; and on causal
    attention it skips the blocks above the diagonal. Measured on a v5p-128 (bench/RESULTS.md, "Attention on
    TPU"): the 1,024-token causal language model's step became 1.3x faster (memory-bound, 42.6 -> 31.8 ms;
    MSSA's own kernel, `tpu_mssa`, which now takes MSSA up to 1,024 tokens, 25.2 ms); at 197 tokens CRATE-MAE's
    became 28 % slower and SimDINO's 4 %; CRATE-α-L/8's 785 tokens (compute-bound with full remat) 7 % slower."""
    return causal and min(t, s) >= MIN_TOKENS


def mesh_axes(mesh: Mesh, names: tuple[str, ...], size: int):
    """The mesh axes among `names` (size > 1) if together they divide `size`, else None (replicated)."""
    axes = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes if len(axes) > 1 else axes[0]


def _pad(x: jax.Array, n: int) -> jax.Array:
    return x if x.shape[2] == n else jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))


def block_size(tp: int, sp: int) -> int:
    """The kernel's block along both sequences: 512 or 256 where they divide both padded lengths, else 128. Each
    query block streams every key/value block from HBM (and the dK/dV pass every query-side block per key
    block), so larger blocks mean fewer re-reads; a 512 × 512 float32 score block (1 MiB) fits in VMEM."""
    return next(b for b in (512, 256, BLOCK) if tp % b == 0 and sp % b == 0)


def _local(q, k, v, *, causal: bool, t: int, s: int):
    """`[B, K, T, p]` attention on one device's shard, padded to whole blocks."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    tp, sp = -(-t // BLOCK) * BLOCK, -(-s // BLOCK) * BLOCK
    b = block_size(tp, sp)
    blocks = fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                           block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b,
                           block_q_dq=b)
    segments = None
    if (tp, sp) != (t, s):
        n = q.shape[0]
        segments = fa.SegmentIds(q=jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (n, tp)),
                                 kv=jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (n, sp)))
    out = fa.flash_attention(_pad(q, tp), _pad(k, sp), _pad(v, sp), segment_ids=segments, causal=causal,
                             sm_scale=1.0 / math.sqrt(q.shape[-1]), block_sizes=blocks)
    return out[:, :, :t]


def flash_attend(q, k, v, *, causal: bool, mesh: Mesh | None) -> jax.Array:
    """Softmax attention `[B, T, K, p] -> [B, T, K, p]` (temperature `1/sqrt(p)`) with the TPU kernel.

    On CPU the kernel runs only under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (tests).
    """
    t, s = q.shape[1], k.shape[1]
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    fn = lambda a, b, c: _local(a, b, c, causal=causal, t=t, s=s)  # noqa: E731
    if mesh is not None and mesh.size > 1:
        spec = P(mesh_axes(mesh, ("data", "fsdp"), q.shape[0]), mesh_axes(mesh, ("tensor",), q.shape[2]), None, None)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return jnp.swapaxes(fn(qt, kt, vt), 1, 2)
