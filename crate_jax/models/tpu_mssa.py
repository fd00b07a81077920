"""MSSA's attention as one TPU kernel for short sequences: the whole sequence of a head in VMEM at once.

MSSA uses one projection `w = x U_k` as query, key and value (docs/math.md, §MSSA), so its attention is
`softmax(w wᵀ / sqrt(p)) w`: a function of a single tensor. For sequences up to `MAX_TOKENS` a head's whole
`[T, T]` score matrix fits in VMEM, so this kernel needs no tiling, no running softmax statistics and no
block padding (the reasons JAX's flash kernel loses at 197 tokens, `tpu_attention.worth_it`):

- forward: reads `w` once, writes the output once; it saves nothing but `w` for the backward pass;
- backward: reads `w` and the output's cotangent once, recomputes the scores on chip and writes `dw` once:
  with `P = softmax(S)`, `dP = dO wᵀ`, `dS = P ∘ (dP - rowsum(P ∘ dP))`, the three roles of `w` add up to
  `dw = (dS + dSᵀ) w / sqrt(p) + Pᵀ dO` (four matmuls per head, the explicit form's backward has four too).

The explicit form instead writes every head's float32 score matrix to HBM and reads it back for the softmax,
the weighted sum and the backward pass. Blocks are `[n, T, h·p]` slices of `w` in its own `[B, T, K·p]`
layout (no transposes): `h` heads side by side fill whole 128-lane rows, `n` sequences per grid step amortise
the step's fixed cost. The sequence axis is the block's full length, so a ragged `T` (197) needs no padding.
Batch over (`data`, `fsdp`) and heads over `tensor` run per chip under `shard_map`, as in `tpu_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec as P

from crate_jax.models import tpu_attention

MAX_TOKENS = 512  # a 512 x 512 float32 score matrix is 1 MiB; the kernel keeps about four of them live
_BLOCK_BYTES = 1 << 20  # target size of one grid step's `w` block (sequences per step: `_rows`)


def worth_it(t: int, causal: bool) -> bool:
    """Sequences this kernel takes: up to `MAX_TOKENS` tokens, not causal (long causal ones go to the flash
    kernel, `tpu_attention.worth_it`)."""
    return not causal and t <= MAX_TOKENS


def _heads_per_block(k: int, p: int) -> int:
    """Heads per block: the fewest whose `h·p` lanes are a multiple of 128 and divide the `K·p` row, else all."""
    h = math.lcm(p, 128) // p
    return h if k % h == 0 else k


def _rows(b: int, t: int, lanes: int, itemsize: int) -> int:
    """Sequences per grid step: the largest divisor of `b` whose block stays under `_BLOCK_BYTES`."""
    per = t * lanes * itemsize
    return max(n for n in range(1, b + 1) if b % n == 0 and (n * per <= _BLOCK_BYTES or n == 1))


def _scores(w, scale):
    s = jax.lax.dot_general(w, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _each_head(n: int, h: int, p: int, body):
    """Run `body(i, lanes)` for every sequence `i` of the block and every head's lane slice."""
    def row(i, carry):
        for j in range(h):
            body(i, pl.ds(j * p, p))
        return carry
    jax.lax.fori_loop(0, n, row, 0)


def _forward_kernel(w_ref, o_ref, *, n: int, h: int, p: int, scale: float):
    def body(i, lanes):
        w = w_ref[i, :, lanes]
        prob = _scores(w, scale)
        o_ref[i, :, lanes] = jnp.dot(prob.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(o_ref.dtype)
    _each_head(n, h, p, body)


def _backward_kernel(w_ref, g_ref, dw_ref, *, n: int, h: int, p: int, scale: float):
    def body(i, lanes):
        w, g = w_ref[i, :, lanes], g_ref[i, :, lanes]
        prob = _scores(w, scale)
        dp = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = prob * (dp - jnp.sum(prob * dp, axis=-1, keepdims=True)) * scale
        dw = jnp.dot((ds + ds.T).astype(w.dtype), w, preferred_element_type=jnp.float32)
        dw += jax.lax.dot_general(prob.astype(g.dtype), g, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        dw_ref[i, :, lanes] = dw.astype(dw_ref.dtype)
    _each_head(n, h, p, body)


def _call(kernel, inputs, *, k: int, p: int, matmuls: int, name: str):
    b, t, lanes = inputs[0].shape
    h = _heads_per_block(k, p)
    n = _rows(b, t, h * p, inputs[0].dtype.itemsize)
    spec = pl.BlockSpec((n, t, h * p), lambda i, j: (i, 0, j))
    nbytes = sum(x.size * x.dtype.itemsize for x in inputs) + inputs[0].size * inputs[0].dtype.itemsize
    return pl.pallas_call(
        functools.partial(kernel, n=n, h=h, p=p, scale=1.0 / math.sqrt(p)),
        grid=(b // n, lanes // (h * p)), in_specs=[spec] * len(inputs), out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(inputs[0].shape, inputs[0].dtype), name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),  # both cores of a v5p
        cost_estimate=pl.CostEstimate(flops=2 * matmuls * b * k * t * t * p, transcendentals=b * k * t * t,
                                      bytes_accessed=nbytes))(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _attention(w, k: int, p: int):
    return _call(_forward_kernel, (w,), k=k, p=p, matmuls=2, name="mssa_short_fwd")


def _attention_fwd(w, k, p):
    return _attention(w, k, p), w


def _attention_bwd(k, p, w, g):
    return (_call(_backward_kernel, (w, g), k=k, p=p, matmuls=4, name="mssa_short_bwd"),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def self_attend(w: jax.Array, *, mesh: Mesh | None) -> jax.Array:
    """`softmax(w wᵀ / sqrt(p)) w` per head, `[B, T, K, p] -> [B, T, K, p]`, with the kernel.

    On CPU the kernel runs only under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (tests).
    """
    b, t, k, p = w.shape
    fn = lambda x: _attention(x, x.shape[2] // p, p)  # noqa: E731  (heads on this device)
    if mesh is not None and mesh.size > 1:
        spec = P(tpu_attention.mesh_axes(mesh, ("data", "fsdp"), b), None,
                 tpu_attention.mesh_axes(mesh, ("tensor",), k))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
    return fn(w.reshape(b, t, k * p)).reshape(b, t, k, p)
