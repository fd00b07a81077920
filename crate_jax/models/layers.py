"""Layers of the CRATE family in Flax NNX: MSSA, ISTA, ODL, plus the ViT attention and MLP.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (`embed`, `heads`, `head_dim`,
`mlp`, `vocab`, `patch`, ...). The layers never mention a mesh: `crate_jax.parallel.sharding`
maps logical names to mesh axes through one rules table.

Tokens are rows: `x [B, N, d]`. Equations: docs/math.md.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import act_sharding, tpu_attention, tpu_mssa

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


# Initialisers -------------------------------------------------------------------------------
def uniform(bound: float) -> Initializer:
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def trunc_normal(std: float, lo: float = -2.0, hi: float = 2.0) -> Initializer:
    """timm / DINO `trunc_normal_(std=std)`: N(0, std²) cut at the absolute values `lo`, `hi` (not σ-multiples)."""
    return lambda key, shape, dtype: std * jax.random.truncated_normal(key, lo / std, hi / std, shape, dtype)


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def xavier_uniform(fan_in: int, fan_out: int) -> Initializer:
    return uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def param(rngs: nnx.Rngs, init: Initializer, shape, axes, dtype) -> nnx.Param:
    """A parameter initialised by `init` with its logical axis names."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


# Basic layers -------------------------------------------------------------------------------
def _normalize_fwd(x: jax.Array, eps: float):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean  # two-pass variance: exact for inputs with a large mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat, (xhat, rstd)


def _normalize_bwd(eps: float, res, g: jax.Array):
    del eps
    xhat, rstd = res
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gx = jnp.mean(g * xhat, axis=-1, keepdims=True)
    return (rstd * (g - mean_g - xhat * mean_gx),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: jax.Array, eps: float) -> jax.Array:
    """`(x − mean(x)) / sqrt(var(x) + eps)` over the last axis, with a hand-written gradient.

    The gradient `rstd · (g − mean(g) − x̂ · mean(g · x̂))` reaches the input as one full-size array.
    Autodiff instead returns it in pieces, the last one a broadcast of the mean's row statistic; XLA
    fuses an add of a broadcast into every consumer without limit, so in a residual network each
    layer's backward kernels re-derived the whole residual-stream gradient of the layers above
    (bench/RESULTS.md, "Profiles"). With one array per LayerNorm, every residual-gradient add has two
    full-size operands and a matmul among its users, which XLA never duplicates.
    """
    return _normalize_fwd(x, eps)[0]


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with biased variance; statistics in float32 (`normalize`)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs,
                 scale_init: Initializer = ones, bias_init: Initializer = zeros):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, scale_init, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, bias_init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = normalize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), self.eps)
        y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return y.astype(self.dtype)


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)` contracting the trailing `len(in_shape)` axes (flax DenseGeneral)."""

    def __init__(self, in_shape, out_shape, *, in_axes, out_axes, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs, kernel_init: Initializer, bias_init: Initializer = zeros):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                            param_dtype)
        self.bias = param(rngs, bias_init, out_shape, out_axes, param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), k,
                                ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """Stochastic depth (docs/math.md §CRATE-α): per-sample mask `floor(keep + U[0,1))`, output `x / keep * mask`."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jnp.floor(keep + jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32))
    return (x / keep * mask).astype(x.dtype)


# Attention -----------------------------------------------------------------------------------
def _cudnn_attention(q, k, v, *, causal: bool, mask):
    """cuDNN's fused kernel (GPU, 16-bit inputs), or None where it does not apply here."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):  # shape, mask or cuDNN version not supported
        return None


def attend(q, k, v, *, impl: str, causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention `[B, T, K, p] -> [B, T, K, p]` with temperature `1/sqrt(p)`.

    `mask` is boolean, broadcastable to `[B, K, T, S]` (True = attend). 'fused' uses the Pallas
    flash-attention kernel on TPU (causal, 512 tokens or more, no `mask`; `tpu_attention`; MSSA up to 1,024
    tokens takes `self_attend`'s kernel instead) and
    cuDNN's fused kernel on a GPU with 16-bit inputs; everywhere else (CPU, GPU float32, short sequences
    on TPU) it is the explicit form below, which is what `jax.nn.dot_product_attention` computes there too,
    minus the reshapes and transposes of its grouped-query layout (bench/RESULTS.md, "Profiles").
    'explicit' is always the textbook einsum + softmax (tests, attention-map analysis).
    """
    if impl == "fused":
        mesh = act_sharding.active_mesh()
        if mask is None and tpu_attention.worth_it(q.shape[1], k.shape[1], causal) and tpu_attention.on_tpu(mesh):
            return tpu_attention.flash_attend(q, k, v, causal=causal, mesh=mesh)
        out = _cudnn_attention(q, k, v, causal=causal, mask=mask)
        if out is not None:
            return out
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btkp,bskp->bkts", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    T, S = logits.shape[-2:]
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkts,bskp->btkp", weights, v)


def self_attend(w, *, impl: str, causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """`attend(w, w, w)`: MSSA's attention, one tensor as query, key and value. 'fused' on a TPU runs MSSA's
    own kernel (`tpu_mssa`: up to 1,024 tokens, causal or not, no `mask`), else `attend`."""
    if impl == "fused" and mask is None and tpu_mssa.worth_it(w.shape[1], causal):
        mesh = act_sharding.active_mesh()
        if tpu_attention.on_tpu(mesh):
            return tpu_mssa.self_attend(w, causal=causal, mesh=mesh)
    return attend(w, w, w, impl=impl, causal=causal, mask=mask)


class MSSA(nnx.Module):
    """Multi-head subspace self-attention: one shared projection `U = [U_1 ... U_K]` serves as query,
    key and value (docs/math.md §CRATE, §MSSA), so it is computed once.

    `proj.kernel [d, K, p]` holds the `U_k`; `out.kernel [K, p, d]` is the free output map (bias
    for CRATE, none for CRATE-α).
    """

    def __init__(self, width: int, heads: int, *, out_bias: bool, causal: bool, attention: str, dtype,
                 param_dtype, rngs: nnx.Rngs, proj_init: Initializer, out_init: Initializer,
                 out_bias_init: Initializer = zeros):
        p = width // heads
        self.causal, self.attention = causal, attention
        self.proj = Dense((width,), (heads, p), in_axes=("embed",), out_axes=("heads", "head_dim"),
                          use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=proj_init)
        self.out = Dense((heads, p), (width,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                         use_bias=out_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         kernel_init=out_init, bias_init=out_bias_init)

    def __call__(self, x, *, mask=None, capture: dict | None = None):
        w = self.proj(x)  # [B, N, K, p]: w_k = x U_k for every head k
        if capture is not None:
            capture["mssa_w"] = w
        return self.out(self_attend(w, impl=self.attention, causal=self.causal, mask=mask))


class MultiHeadAttention(nnx.Module):
    """Standard attention with separate query/key/value projections (ViT baseline, CLIPA text tower)."""

    def __init__(self, width: int, heads: int, *, causal: bool, attention: str, dtype, param_dtype,
                 rngs: nnx.Rngs, qkv_init: Initializer, out_init: Initializer, bias_init: Initializer = zeros):
        p = width // heads
        self.causal, self.attention = causal, attention
        kw = dict(in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=True, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs, kernel_init=qkv_init, bias_init=bias_init)
        self.query = Dense((width,), (heads, p), **kw)
        self.key = Dense((width,), (heads, p), **kw)
        self.value = Dense((width,), (heads, p), **kw)
        self.out = Dense((heads, p), (width,), in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=out_init,
                         bias_init=bias_init)

    def __call__(self, x, *, mask=None, capture: dict | None = None):
        q, k, v = self.query(x), self.key(x), self.value(x)
        if capture is not None:
            capture["attn_q"], capture["attn_k"] = q, k
        return self.out(attend(q, k, v, impl=self.attention, causal=self.causal, mask=mask))


# Sparse coding blocks ----------------------------------------------------------------------
class ISTA(nnx.Module):
    """CRATE's ISTA block (docs/math.md §CRATE): one step on the code, initialised at the input itself.

    `x_next = ReLU(y + η (y D − (y Dᵀ) D) − ηλ)` with the square dictionary `D [d, d]`
    (torch `1.fn.weight`). There is no residual: the output replaces the input.
    """

    def __init__(self, width: int, *, eta: float, lmbda: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eta, self.lmbda, self.dtype = eta, lmbda, dtype
        self.D = param(rngs, uniform(math.sqrt(6.0 / width)), (width, width), ("embed", "mlp"), param_dtype)

    def __call__(self, y):
        D = self.D[...].astype(self.dtype)
        y = y.astype(self.dtype)
        grad = y @ D - (y @ D.T) @ D
        return jax.nn.relu(y + self.eta * grad - self.eta * self.lmbda)


class ODL(nnx.Module):
    """CRATE-α's overcomplete dictionary-learning block (docs/math.md §ODL), generalised.

    From a zero code, `steps` unrolled ISTA steps against `D [d, m]` (m = ratio·d):
    `a ← ReLU(a − η (a Dᵀ − x) D − ηλ)`, so the first is `ReLU(η x D − ηλ)`; then decode
    `a D1ᵀ` with a separate dictionary `D1` (or `D` when not decoupled). The residual is the
    caller's (the block adds it when `odl_residual`).
    """

    def __init__(self, width: int, *, ratio: int, steps: int, decoupled: bool, eta: float, lmbda: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        m = ratio * width
        self.eta, self.lmbda, self.steps, self.dtype = eta, lmbda, steps, dtype
        init = uniform(math.sqrt(6.0 / width))  # flax kaiming_uniform, fan_in = d (docs/math.md §CRATE-α)
        self.D = param(rngs, init, (width, m), ("embed", "mlp"), param_dtype)
        self.D1 = param(rngs, init, (width, m), ("embed", "mlp"), param_dtype) if decoupled else None

    def __call__(self, x, *, capture: dict | None = None):
        D = self.D[...].astype(self.dtype)
        x = x.astype(self.dtype)
        thr = self.eta * self.lmbda
        a = jax.nn.relu(self.eta * (x @ D) - thr)
        for _ in range(self.steps - 1):
            a = jax.nn.relu(a - self.eta * ((a @ D.T - x) @ D) - thr)
        if capture is not None:
            capture["code"] = a
        D1 = D if self.D1 is None else self.D1[...].astype(self.dtype)
        return a @ D1.T


class MLP(nnx.Module):
    """ViT MLP: `Dense_1(gelu(Dense_0(x)))` with biases; the tanh GELU (big_vision, GPT-2) unless
    `approximate=False` (torch's exact erf `nn.GELU`, the DINO ViT)."""

    def __init__(self, width: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 in_init: Initializer, out_init: Initializer, bias_init: Initializer = zeros,
                 approximate: bool = True):
        self.approximate = approximate
        self.fc1 = Dense((width,), (mlp_dim,), in_axes=("embed",), out_axes=("mlp",), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, kernel_init=in_init, bias_init=bias_init)
        self.fc2 = Dense((mlp_dim,), (width,), in_axes=("mlp",), out_axes=("embed",), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, kernel_init=out_init, bias_init=bias_init)

    def __call__(self, x, *, capture: dict | None = None):
        h = jax.nn.gelu(self.fc1(x), approximate=self.approximate)
        if capture is not None:
            capture["code"] = h
        return self.fc2(h)
