"""MSSA's attention as one TPU kernel: a head's whole sequence on chip at once, up to 1,024 tokens.

MSSA uses one projection `w = x U_k` as query, key and value (docs/math.md, §MSSA), so its attention is
`softmax(w wᵀ / sqrt(p)) w`: a function of a single tensor. A head's whole sequence (`[T, p]`) fits in VMEM,
and so do its scores a chunk of query rows at a time, so this kernel needs no running softmax statistics, no
re-reads of keys and values, and no block padding (what makes JAX's flash kernel lose at 197 tokens,
`tpu_attention.worth_it`):

- forward: reads `w` once, writes the output once; it saves nothing but `w` for the backward pass;
- backward: reads `w` and the output's cotangent `G` once, recomputes the scores on chip and writes `dw` once:
  with `P = softmax(S)`, `dP = G wᵀ`, `dS = P ∘ (dP - rowsum(P ∘ dP))`, the three roles of `w` add up to
  `dw = (dS + dSᵀ) w / sqrt(p) + Pᵀ G` (four matmuls per head, as many as the explicit form's backward).

A bidirectional sequence up to `WHOLE` tokens is one chunk; longer or causal ones go in chunks of `ROWS` query
rows, a causal chunk against the keys up to its last row only (the blocks above the diagonal are never
computed), with the query-role gradient of a chunk and the key/value-role gradients summed in float32 on chip
(five matmuls per chunk: the query and key roles no longer merge).

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

MAX_TOKENS = 1024  # the kernel keeps a head's whole sequence on chip (`_chunks`)
WHOLE = 512  # bidirectional sequences up to this length: one chunk, the score matrix whole (at most 1 MiB)
ROWS = 256  # else the query rows go in chunks of this many: a chunk's scores are `[ROWS, T]`
_BLOCK_BYTES = 1 << 20  # target size of one grid step's `w` block (sequences per step: `_rows`)


def worth_it(t: int, causal: bool) -> bool:
    """Sequences MSSA sends to this kernel: up to `MAX_TOKENS` tokens, causal or not. Measured on a v5p-128
    (bench/RESULTS.md, "Attention on TPU"), every recipe's best layout is faster with it. On CRATE-α-L/8's 785
    bidirectional tokens the chunked backward's fifth matmul makes a fully rematerialised step 1 % slower, but
    without the score matrices the step fits without remat, which is 1.25x faster than the explicit form's best."""
    return t <= MAX_TOKENS


def _chunks(t: int, causal: bool) -> list[tuple[int, int, int]]:
    """The query-row chunks `(r0, r1, keys)` of a sequence: one chunk for a bidirectional sequence up to `WHOLE`
    tokens, else `ROWS`-row chunks; a causal chunk sees keys `[0, r1)` only (the blocks above the diagonal are
    never computed), a bidirectional one all `t`."""
    rows = t if (t <= WHOLE and not causal) or t <= ROWS else ROWS
    return [(r0, min(r0 + rows, t), min(r0 + rows, t) if causal else t) for r0 in range(0, t, rows)]


def _flops(t: int, p: int, causal: bool, forward: bool) -> int:
    """Per head and sequence: 2 matmuls a chunk forward; backward 4 for a single chunk (the query and key
    roles' gradients merged), else 5 (`_backward_kernel`)."""
    chunks = _chunks(t, causal)
    matmuls = 2 if forward else (4 if len(chunks) == 1 else 5)
    return 2 * matmuls * p * sum((r1 - r0) * keys for r0, r1, keys in chunks)


def _heads_per_block(k: int, p: int) -> int:
    """Heads per block: the fewest whose `h·p` lanes are a multiple of 128 and divide the `K·p` row, else all."""
    h = math.lcm(p, 128) // p
    return h if k % h == 0 else k


def _rows(b: int, t: int, lanes: int, itemsize: int) -> int:
    """Sequences per grid step: the largest divisor of `b` whose block stays under `_BLOCK_BYTES`."""
    per = t * lanes * itemsize
    return max(n for n in range(1, b + 1) if b % n == 0 and (n * per <= _BLOCK_BYTES or n == 1))


def _t(a, b):
    """`aᵀ b` (contracting the rows), float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _nt(a, b):
    """`a bᵀ` (contracting the columns), float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _probs(wq, wk, r0: int, scale: float, causal: bool):
    """Softmax of `wq wkᵀ · scale` over the keys, float32; causal: key `j` hidden from query `r0 + i` if `j > r0 + i`."""
    s = _nt(wq, wk) * scale
    if causal:
        row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) + r0
        s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) <= row, s, -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _each_head(n: int, h: int, p: int, body):
    """Run `body(i, lanes)` for every sequence `i` of the block and every head's lane slice."""
    def row(i, carry):
        for j in range(h):
            body(i, pl.ds(j * p, p))
        return carry
    jax.lax.fori_loop(0, n, row, 0)


def _forward_kernel(w_ref, o_ref, *, n: int, h: int, p: int, t: int, causal: bool, scale: float):
    def body(i, lanes):
        for r0, r1, keys in _chunks(t, causal):
            wk = w_ref[i, pl.ds(0, keys), lanes]
            prob = _probs(w_ref[i, pl.ds(r0, r1 - r0), lanes], wk, r0, scale, causal)
            o = jnp.dot(prob.astype(wk.dtype), wk, preferred_element_type=jnp.float32)
            o_ref[i, pl.ds(r0, r1 - r0), lanes] = o.astype(o_ref.dtype)
    _each_head(n, h, p, body)


def _backward_kernel(w_ref, g_ref, dw_ref, acc_ref, *, n: int, h: int, p: int, t: int, causal: bool,
                     scale: float):
    """Per chunk of query rows `c` (keys `k`): `dP = G_c w_kᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP))`, and the
    three roles of `w` add `dS w_k` (query rows), `dSᵀ w_c + Pᵀ G_c` (key and value rows) to `dw`, summed in
    float32 in `acc_ref`. A single chunk merges the first two: `(dS + dSᵀ) w`."""
    chunks = _chunks(t, causal)

    def body(i, lanes):
        if len(chunks) > 1:
            acc_ref[...] = jnp.zeros_like(acc_ref)
        for r0, r1, keys in chunks:
            rows, ks = pl.ds(r0, r1 - r0), pl.ds(0, keys)
            wq, wk, g = w_ref[i, rows, lanes], w_ref[i, ks, lanes], g_ref[i, rows, lanes]
            prob = _probs(wq, wk, r0, scale, causal)
            dp = _nt(g, wk)
            ds = prob * (dp - jnp.sum(prob * dp, axis=-1, keepdims=True)) * scale
            value = _t(prob.astype(g.dtype), g)
            if len(chunks) == 1:
                dw = jnp.dot((ds + ds.T).astype(wk.dtype), wk, preferred_element_type=jnp.float32) + value
                dw_ref[i, :, lanes] = dw.astype(dw_ref.dtype)
                return
            acc_ref[rows, :] += jnp.dot(ds.astype(wk.dtype), wk, preferred_element_type=jnp.float32)
            acc_ref[ks, :] += _t(ds.astype(wq.dtype), wq) + value
        dw_ref[i, :, lanes] = acc_ref[...].astype(dw_ref.dtype)
    _each_head(n, h, p, body)


def _call(kernel, inputs, *, k: int, p: int, causal: bool, name: str):
    b, t, lanes = inputs[0].shape
    h = _heads_per_block(k, p)
    n = _rows(b, t, h * p, inputs[0].dtype.itemsize)
    spec = pl.BlockSpec((n, t, h * p), lambda i, j: (i, 0, j))
    forward = kernel is _forward_kernel
    itemsize = inputs[0].dtype.itemsize
    return pl.pallas_call(
        functools.partial(kernel, n=n, h=h, p=p, t=t, causal=causal, scale=1.0 / math.sqrt(p)),
        grid=(b // n, lanes // (h * p)), in_specs=[spec] * len(inputs), out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(inputs[0].shape, inputs[0].dtype), name=name,
        scratch_shapes=[] if forward else [pltpu.VMEM((t, p), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),  # both cores of a v5p
        cost_estimate=pl.CostEstimate(flops=b * k * _flops(t, p, causal, forward), transcendentals=b * k * t * t,
                                      bytes_accessed=(len(inputs) + 1) * b * t * lanes * itemsize))(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _attention(w, k: int, p: int, causal: bool):
    return _call(_forward_kernel, (w,), k=k, p=p, causal=causal, name="mssa_fwd")


def _attention_fwd(w, k, p, causal):
    return _attention(w, k, p, causal), w


def _attention_bwd(k, p, causal, w, g):
    return (_call(_backward_kernel, (w, g), k=k, p=p, causal=causal, name="mssa_bwd"),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def self_attend(w: jax.Array, *, causal: bool, mesh: Mesh | None) -> jax.Array:
    """`softmax(w wᵀ / sqrt(p)) w` per head, `[B, T, K, p] -> [B, T, K, p]`, with the kernel.

    On CPU the kernel runs only under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (tests).
    """
    b, t, k, p = w.shape
    fn = lambda x: _attention(x, x.shape[2] // p, p, causal)  # noqa: E731  (heads on this device)
    if mesh is not None and mesh.size > 1:
        spec = P(tpu_attention.mesh_axes(mesh, ("data", "fsdp"), b), None,
                 tpu_attention.mesh_axes(mesh, ("tensor",), k))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
    return fn(w.reshape(b, t, k * p)).reshape(b, t, k, p)
