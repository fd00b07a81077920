"""Independent float64 numpy reference of the causal language models, written from docs/math.md §Language models (CRATE-GPT)
and the public GPT-2 definition, sharing no code with ``crate_jax`` (only the primitives of
``reference_np``, themselves written from docs/math.md).

Parameter trees are flat dicts named as the files that hold them:

* CRATE-GPT: the nanoGPT-style state_dict of CRATE pull request #13 (docs/math.md §Language models):
  ``transformer.wte.weight [V, d]``, ``transformer.wpe.weight [block, d]``, per block ``transformer.h.{i}.``
  ``prenorm_1.{weight,bias}``, ``attn.c_attn.weight [d, d]`` (torch Linear, ``y = x Wᵀ``, no bias),
  ``attn.c_proj.{weight [d, d], bias}``, ``attn.bias [1, 1, block, block]`` (the causal-mask buffer),
  ``prenorm_2.{weight,bias}``, ``ista.weight [d, d]``; ``lm_head.weight`` (tied: the same values as wte).
* GPT-2: a Hugging Face ``GPT2LMHeadModel`` state_dict. ``Conv1D`` weights are ``[in, out]`` (``y = x W + b``):
  ``transformer.h.{i}.ln_1``, ``attn.c_attn.{weight [d, 3d], bias [3d]}`` (q | k | v along the output),
  ``attn.c_proj [d, d]``, ``ln_2``, ``mlp.c_fc [d, 4d]``, ``mlp.c_proj [4d, d]``, ``transformer.ln_f``,
  ``lm_head.weight`` (tied), plus the buffers ``attn.bias`` / ``attn.masked_bias``.
* CRATE-α LM: crate_jax's own '/'-joined tree (there is no official CRATE-α LM), per-layer arrays
  stacked ``[depth, ...]``.
"""

from __future__ import annotations

import math

import numpy as np

from reference_np import crate_ista_block, gelu_tanh, layer_norm, odl_block, softmax


def causal_attention(q, k, v):
    """``[B, T, K, p]`` each -> ``[B, T, K, p]``: softmax(q kᵀ / sqrt(p)) v with key j allowed iff j <= i."""
    T, p = q.shape[1], q.shape[-1]
    logits = np.einsum("btkp,bskp->bkts", q, k, optimize=True) / math.sqrt(p)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    return np.einsum("bkts,bskp->btkp", softmax(logits, -1), v, optimize=True)


def _get(sd, key, used):
    used.add(key)
    return np.asarray(sd[key], np.float64)


def _check_used(sd, used, ignore=()):
    extra = sorted(k for k in sd if k not in used and not any(k.endswith(s) for s in ignore))
    if extra:
        raise KeyError(f"parameters not used by the reference: {extra[:8]}")


def _depth(sd, probe):
    i = 0
    while f"transformer.h.{i}.{probe}" in sd:
        i += 1
    return i


def crate_gpt_forward(sd, idx, *, heads, eta=0.1, lmbda=0.1, eps=1e-5):
    """CRATE-GPT logits ``[B, T, V]`` (docs/math.md §Language models): ``x = wte[idx] + wpe[:T]``; per block
    ``x = x + c_proj(causal-MSSA(LN1 x))``, ``x = ISTA(LN2 x)`` (no residual); no final LN; ``x wteᵀ``."""
    used: set = set()
    wte = _get(sd, "transformer.wte.weight", used)
    if "lm_head.weight" in sd:
        np.testing.assert_array_equal(np.asarray(sd["lm_head.weight"]), np.asarray(sd["transformer.wte.weight"]))
        used.add("lm_head.weight")
    idx = np.asarray(idx)
    B, T = idx.shape
    x = wte[idx] + _get(sd, "transformer.wpe.weight", used)[:T]
    d = x.shape[-1]
    p = d // heads
    for i in range(_depth(sd, "ista.weight")):
        pre = f"transformer.h.{i}."
        h = layer_norm(x, _get(sd, pre + "prenorm_1.weight", used), _get(sd, pre + "prenorm_1.bias", used), eps)
        w = (h @ _get(sd, pre + "attn.c_attn.weight", used).T).reshape(B, T, heads, p)  # q = k = v = w
        o = causal_attention(w, w, w).reshape(B, T, d)
        x = x + o @ _get(sd, pre + "attn.c_proj.weight", used).T + _get(sd, pre + "attn.c_proj.bias", used)
        y = layer_norm(x, _get(sd, pre + "prenorm_2.weight", used), _get(sd, pre + "prenorm_2.bias", used), eps)
        x = crate_ista_block(y, _get(sd, pre + "ista.weight", used), eta, lmbda)
    _check_used(sd, used, ignore=("attn.bias",))
    return x @ wte.T


def gpt2_forward(sd, idx, *, heads, eps=1e-5):
    """GPT-2 logits ``[B, T, V]``: pre-LN blocks ``x += c_proj(attn(LN1 x))``, ``x += mlp(LN2 x)`` with a
    GELU (tanh) MLP, final ``ln_f``, tied head ``x wteᵀ``. Conv1D: ``y = x W + b``."""
    used: set = set()
    wte = _get(sd, "transformer.wte.weight", used)
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
    idx = np.asarray(idx)
    B, T = idx.shape
    x = wte[idx] + _get(sd, "transformer.wpe.weight", used)[:T]
    d = x.shape[-1]
    p = d // heads
    for i in range(_depth(sd, "ln_1.weight")):
        pre = f"transformer.h.{i}."
        g = lambda n: _get(sd, pre + n, used)  # noqa: E731
        h = layer_norm(x, g("ln_1.weight"), g("ln_1.bias"), eps)
        qkv = h @ g("attn.c_attn.weight") + g("attn.c_attn.bias")
        q, k, v = (a.reshape(B, T, heads, p) for a in np.split(qkv, 3, axis=-1))
        x = x + causal_attention(q, k, v).reshape(B, T, d) @ g("attn.c_proj.weight") + g("attn.c_proj.bias")
        h = layer_norm(x, g("ln_2.weight"), g("ln_2.bias"), eps)
        x = x + gelu_tanh(h @ g("mlp.c_fc.weight") + g("mlp.c_fc.bias")) @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias")
    x = layer_norm(x, _get(sd, "transformer.ln_f.weight", used), _get(sd, "transformer.ln_f.bias", used), eps)
    _check_used(sd, used, ignore=("attn.bias", "attn.masked_bias"))
    return x @ wte.T


def crate_alpha_lm_forward(tree, idx, *, heads, eta=0.1, lmbda=0.1, eps=1e-6, final_eps=1e-6):
    """CRATE-α LM logits ``[B, T, V]``: per block ``x += out(causal-MSSA(LN_0 x))`` (no bias),
    ``x += ODL(LN_1 x)`` (docs/math.md §CRATE-α, §ODL), final LN, tied head."""
    used: set = set()
    g = lambda n: _get(tree, n, used)  # noqa: E731
    wte = g("embed/embedding")
    idx = np.asarray(idx)
    B, T = idx.shape
    x = wte[idx] + g("pos_embedding")[:T]
    d = x.shape[-1]
    b = "encoder/blocks/"
    for i in range(g(b + "ln1/scale").shape[0]):
        at = lambda n: g(b + n)[i]  # noqa: E731
        h = layer_norm(x, at("ln1/scale"), at("ln1/bias"), eps)
        w = np.einsum("btd,dkp->btkp", h, at("mssa/proj/kernel"))
        x = x + np.einsum("btkp,kpd->btd", causal_attention(w, w, w), at("mssa/out/kernel"))
        y = layer_norm(x, at("ln2/scale"), at("ln2/bias"), eps)
        x = x + odl_block(y, at("odl/D"), at("odl/D1"), eta, lmbda)
    x = layer_norm(x, g("final_norm/scale"), g("final_norm/bias"), final_eps)
    _check_used(tree, used)
    return x @ wte.T


def _ln(rng, d):
    return 1.0 + 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)


def random_crate_gpt_state_dict(seed, *, vocab, block, dim, depth):
    """A random CRATE-GPT state_dict (names and shapes of docs/weights.md), randomised LayerNorms, the causal-mask
    buffers and a tied ``lm_head.weight`` included."""
    rng = np.random.default_rng(seed)
    sd = {"transformer.wte.weight": 0.5 * rng.standard_normal((vocab, dim)),
          "transformer.wpe.weight": 0.5 * rng.standard_normal((block, dim))}
    for i in range(depth):
        pre = f"transformer.h.{i}."
        sd[pre + "prenorm_1.weight"], sd[pre + "prenorm_1.bias"] = _ln(rng, dim)
        sd[pre + "attn.c_attn.weight"] = dim ** -0.5 * rng.standard_normal((dim, dim))
        sd[pre + "attn.c_proj.weight"] = dim ** -0.5 * rng.standard_normal((dim, dim))
        sd[pre + "attn.c_proj.bias"] = 0.1 * rng.standard_normal(dim)
        sd[pre + "attn.bias"] = np.tril(np.ones((block, block)))[None, None]
        sd[pre + "prenorm_2.weight"], sd[pre + "prenorm_2.bias"] = _ln(rng, dim)
        sd[pre + "ista.weight"] = dim ** -0.5 * rng.standard_normal((dim, dim))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def random_gpt2_hf_state_dict(seed, *, vocab, block, dim, depth):
    """A random Hugging Face GPT-2 state_dict (Conv1D ``[in, out]`` weights), randomised LayerNorms, with the
    ``attn.bias`` / ``attn.masked_bias`` buffers and a tied ``lm_head.weight``."""
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s)  # noqa: E731
    sd = {"transformer.wte.weight": 0.5 * n(vocab, dim), "transformer.wpe.weight": 0.5 * n(block, dim)}
    for i in range(depth):
        pre = f"transformer.h.{i}."
        sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = _ln(rng, dim)
        sd[pre + "attn.bias"] = np.tril(np.ones((block, block)))[None, None]
        sd[pre + "attn.masked_bias"] = np.array(-1e4)
        sd[pre + "attn.c_attn.weight"] = dim ** -0.5 * n(dim, 3 * dim)
        sd[pre + "attn.c_attn.bias"] = 0.1 * n(3 * dim)
        sd[pre + "attn.c_proj.weight"] = dim ** -0.5 * n(dim, dim)
        sd[pre + "attn.c_proj.bias"] = 0.1 * n(dim)
        sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = _ln(rng, dim)
        sd[pre + "mlp.c_fc.weight"] = dim ** -0.5 * n(dim, 4 * dim)
        sd[pre + "mlp.c_fc.bias"] = 0.1 * n(4 * dim)
        sd[pre + "mlp.c_proj.weight"] = (4 * dim) ** -0.5 * n(4 * dim, dim)
        sd[pre + "mlp.c_proj.bias"] = 0.1 * n(dim)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = _ln(rng, dim)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd
