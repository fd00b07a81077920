"""Independent float64 numpy reference of the official CRATE, CRATE-alpha and CLIPA models.

Written from the equations of docs/math.md alone (its sections are cited inline) and deliberately
independent of the ``crate_jax`` package, so that parity tests compare two implementations that
share no code. Everything is computed in float64 with plain numpy (``scipy.ndimage.zoom`` only
where the official loader uses it).

Parameter trees are flat dicts ``name -> array`` (anything ``np.asarray`` accepts), named exactly
as the official checkpoints:

* CRATE (torch ``model/crate.py``): the state_dict names of docs/weights.md §Layouts.
* CRATE-alpha, JAX/big_vision: the '/'-joined paths of docs/weights.md §Layouts (no ``params/`` prefix).
* CRATE-alpha, torch_inference: the state_dict names of docs/weights.md §Layouts.
* CLIPA two-tower: the ``img/...``, ``txt/...`` and ``t`` paths of docs/math.md §CLIPA.

Token matrices keep tokens as rows: ``[B, N, d]`` (docs/math.md §Notation).
Every forward checks that each parameter it was given was used, so a wrong depth, a stray
prefix or a misspelt name fails loudly instead of silently changing the model.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

# ----------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------


def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis with biased variance: ``(x-mean)/sqrt(var+eps)*scale+bias``.

    Args:
      x: ``[..., D]``.
      scale, bias: ``[D]`` or None (no affine term).
      eps: the variance epsilon (torch default 1e-5, flax default 1e-6).
    Returns:
      ``[..., D]`` float64.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def softmax(x, axis=-1):
    """Numerically stable softmax of ``x`` along ``axis``."""
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def relu(x):
    """``max(x, 0)``."""
    return np.maximum(x, 0.0)


def gelu_tanh(x):
    """GELU, tanh approximation (flax ``nn.gelu`` default, ``approximate=True``)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def attention_heads(q, k, v):
    """Softmax dot-product attention per head with temperature ``1/sqrt(p)``.

    Args:
      q, k, v: ``[B, N, K, p]`` (for MSSA all three are the same array ``w``).
    Returns:
      ``[B, N, K, p]``: ``softmax(q k^T / sqrt(p)) v`` per head, softmax over the key axis.
    """
    p = q.shape[-1]
    logits = np.einsum("bqkp,bskp->bkqs", q / math.sqrt(p), k, optimize=True)
    return np.einsum("bkqs,bskp->bqkp", softmax(logits, -1), v, optimize=True)


def mssa_heads(w):
    """MSSA core (docs/math.md §CRATE, §MSSA): one shared projection, ``q = k = v = w``.

    Args:
      w: ``[B, N, K, p]`` (``w_k = h @ U_k`` for every head ``k``).
    Returns:
      ``[B, N, K, p]``: ``softmax(w_k w_k^T / sqrt(p)) w_k`` per head.
    """
    return attention_heads(w, w, w)


def crate_ista_block(y, W, eta=0.1, lmbda=0.1):
    """CRATE's ISTA block (docs/math.md §CRATE), acting on the LayerNorm output ``y``, no residual.

    ``x_next = ReLU(y + eta (y W - (y W^T) W) - eta lmbda)``: one non-negative ISTA step on
    the code, started from the input itself, with dictionary ``D = W`` (column form
    ``ReLU(y + eta D^T (y - D y) - eta lmbda)``).

    Args:
      y: ``[B, N, d]`` (the LN2 output).
      W: ``[d, d]`` (the ``.1.fn.weight`` tensor).
    Returns:
      ``[B, N, d]``.
    """
    return relu(y + eta * (y @ W - (y @ W.T) @ W) - eta * lmbda)


def odl_codes(x, D, eta=0.1, lmbda=0.1):
    """The two unrolled ISTA steps of CRATE-alpha's ODL block from a zero code (docs/math.md §ODL).

    Args:
      x: ``[B, N, d]`` (the LN_1 output).
      D: ``[d, m]`` with ``m = 4d`` (the ``D`` dictionary).
    Returns:
      ``[B, N, m]``: the non-negative sparse code ``a2``.
    """
    a1 = relu(eta * (x @ D) - eta * lmbda)
    return relu(a1 - eta * ((a1 @ D.T - x) @ D) - eta * lmbda)


def odl_block(x, D, D1, eta=0.1, lmbda=0.1):
    """CRATE-alpha's ODL block output (docs/math.md §ODL): ``odl_codes(x, D) @ D1^T``, ``[B, N, d]``.

    The residual around the block is added by the caller.
    """
    return odl_codes(x, D, eta, lmbda) @ D1.T


def patchify_crate(images_nchw, patch):
    """CRATE's patchify (docs/math.md §CRATE): ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``.

    Args:
      images_nchw: ``[B, C, H, W]`` with H, W divisible by ``patch``.
    Returns:
      ``[B, (H/P)(W/P), P*P*C]``, tokens row-major over the patch grid, features ordered
      (row-in-patch, col-in-patch, channel).
    """
    x = np.asarray(images_nchw, np.float64)
    b, c, hh, ww = _check_image(x, patch, "NCHW", channels_axis=1)
    h, w = hh // patch, ww // patch
    x = x.reshape(b, c, h, patch, w, patch).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, patch * patch * c)


def conv_stem_hwio(images_nhwc, kernel, bias, patch):
    """Stride-P, P x P VALID convolution with a flax kernel ``[P, P, C, d]`` (docs/math.md §CRATE-α).

    Args:
      images_nhwc: ``[B, H, W, C]``.
      kernel: ``[P, P, C, d]``; bias: ``[d]`` or None.
    Returns:
      ``[B, h*w, d]`` tokens, row-major over the ``h x w`` grid.
    """
    x = np.asarray(images_nhwc, np.float64)
    b, hh, ww, c = _check_image(x, patch, "NHWC", channels_axis=3)
    h, w = hh // patch, ww // patch
    x = x.reshape(b, h, patch, w, patch, c)
    out = np.einsum("bhiwjc,ijcd->bhwd", x, kernel, optimize=True)
    out = out.reshape(b, h * w, kernel.shape[-1])
    return out if bias is None else out + bias


def conv_stem_oihw(images_nchw, weight, bias, patch):
    """Stride-P, P x P convolution with a torch weight ``[d, C, P, P]`` (docs/weights.md §Layouts).

    Args:
      images_nchw: ``[B, C, H, W]``.
      weight: ``[d, C, P, P]``; bias: ``[d]`` or None.
    Returns:
      ``[B, h*w, d]`` tokens, row-major over the ``h x w`` grid (torch ``flatten(2)``).
    """
    x = np.asarray(images_nchw, np.float64)
    b, c, hh, ww = _check_image(x, patch, "NCHW", channels_axis=1)
    h, w = hh // patch, ww // patch
    x = x.reshape(b, c, h, patch, w, patch)
    out = np.einsum("bchiwj,dcij->bhwd", x, weight, optimize=True)
    out = out.reshape(b, h * w, weight.shape[0])
    return out if bias is None else out + bias


def _check_image(x, patch, layout, channels_axis):
    if x.ndim != 4:
        raise ValueError(f"images must be a 4-D {layout} array, got shape {x.shape}")
    spatial = [a for a in (1, 2, 3) if a != channels_axis]
    for a in spatial:
        if x.shape[a] % patch:
            raise ValueError(
                f"image size {x.shape[spatial[0]]}x{x.shape[spatial[1]]} ({layout} shape "
                f"{x.shape}) is not divisible by the patch size {patch}"
            )
    return x.shape


# ----------------------------------------------------------------------------------------------
# Parameter access with actionable errors
# ----------------------------------------------------------------------------------------------


class _Params:
    """A read-only view of a flat ``name -> array`` dict (optionally below a prefix).

    Records every key it hands out so that ``check_all_used`` can reject trees with names the
    model did not consume.
    """

    def __init__(self, tree, what, prefix=""):
        if not isinstance(tree, dict):
            raise TypeError(
                f"{what}: expected a flat dict name -> array, got {type(tree).__name__}"
            )
        self._what = what
        self._prefix = prefix
        self._tree = {k[len(prefix) :]: v for k, v in tree.items() if k.startswith(prefix)}
        self._used = set()
        if not self._tree:
            raise KeyError(
                f"{what}: no parameter names start with '{prefix}' "
                f"(first names given: {sorted(tree)[:5]})"
            )

    def has(self, key):
        return key in self._tree

    def get(self, key, shape=None):
        """The float64 array at ``key``; ``shape`` (tuple, None entries free) is checked."""
        if key not in self._tree:
            hint = ""
            if any(k.startswith("params/") for k in self._tree):
                hint = " (the names carry a 'params/' prefix: strip it first)"
            elif any(k.startswith("module.") for k in self._tree):
                hint = " (the names carry a DDP 'module.' prefix: strip it first)"
            exp = "" if shape is None else f" with shape {tuple(shape)}"
            raise KeyError(f"{self._what}: missing parameter '{self._prefix}{key}'{exp}{hint}")
        arr = np.asarray(self._tree[key], dtype=np.float64)
        if shape is not None:
            ok = len(arr.shape) == len(shape) and all(
                s is None or s == a for s, a in zip(shape, arr.shape)
            )
            if not ok:
                raise ValueError(
                    f"{self._what}: parameter '{self._prefix}{key}' has shape {arr.shape}, "
                    f"expected {tuple(shape)} (None = any)"
                )
        self._used.add(key)
        return arr

    def get_optional(self, key, shape=None):
        return self.get(key, shape) if key in self._tree else None

    def count_blocks(self, fmt, probe):
        """Number of consecutive blocks ``i = 0, 1, ...`` with a ``fmt.format(i) + probe`` key."""
        i = 0
        while (fmt.format(i) + probe) in self._tree:
            i += 1
        return i

    def check_all_used(self):
        extra = sorted(set(self._tree) - self._used)
        if extra:
            shown = ", ".join(f"'{self._prefix}{k}'" for k in extra[:8])
            more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
            raise KeyError(
                f"{self._what}: parameters not used by the model: {shown}{more} "
                f"(wrong layout, depth or posemb option?)"
            )


def _heads_dim(width, heads, what):
    if heads < 1 or width % heads:
        raise ValueError(f"{what}: width {width} is not divisible by heads={heads}")
    return width // heads


# ----------------------------------------------------------------------------------------------
# CRATE (torch model/crate.py), docs/math.md §CRATE
# ----------------------------------------------------------------------------------------------

_CRATE_EPS = 1e-5  # torch LayerNorm default, used everywhere in CRATE (docs/math.md §CRATE)


def crate_intermediates(sd, images_nchw, *, patch, heads, eta=0.1, lmbda=0.1):
    """CRATE forward up to the encoder output, keeping what the official hooks see.

    Args:
      sd: CRATE torch state_dict (docs/weights.md §Layouts names), values ``np.asarray``-able.
      images_nchw: ``[B, C, H, W]``.
      patch: patch size P. heads: number of heads K.
    Returns:
      dict with
        ``tokens``: ``[B, N+1, d]`` output of the last layer (cls first),
        ``mssa_proj``: per layer ``[B, K, N+1, p]``, the qkv projections ``LN1(Z^l) @ U_k``
          (what the compression hook of docs/math.md §Coding rate reshapes),
        ``ista_out``: per layer ``[B, N+1, d]``, ``Z^{l+1}`` (what the sparsity hook sees),
        ``params``: the ``_Params`` view (so callers can keep reading the head).
    """
    P = _Params(sd, "CRATE state_dict")
    x = patchify_crate(images_nchw, patch)  # [B, N, P*P*C]
    b, n, f = x.shape
    x = layer_norm(
        x, P.get("to_patch_embedding.1.weight", (f,)), P.get("to_patch_embedding.1.bias", (f,)),
        _CRATE_EPS,
    )
    We = P.get("to_patch_embedding.2.weight", (None, f))
    d = We.shape[0]
    x = x @ We.T + P.get("to_patch_embedding.2.bias", (d,))
    x = layer_norm(
        x, P.get("to_patch_embedding.3.weight", (d,)), P.get("to_patch_embedding.3.bias", (d,)),
        _CRATE_EPS,
    )
    cls = P.get("cls_token", (1, 1, d))
    pos = P.get("pos_embedding", (1, None, d))
    if pos.shape[1] < n + 1:
        raise ValueError(
            f"CRATE state_dict: pos_embedding has {pos.shape[1]} rows, the image needs {n + 1} "
            f"({n} patches + cls)"
        )
    x = np.concatenate([np.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos[:, : n + 1]

    depth = P.count_blocks("transformer.layers.{}.", "0.norm.weight")
    mssa_proj, ista_out = [], []
    for i in range(depth):
        pre = f"transformer.layers.{i}."
        h = layer_norm(x, P.get(pre + "0.norm.weight", (d,)), P.get(pre + "0.norm.bias", (d,)),
                       _CRATE_EPS)
        Wqkv = P.get(pre + "0.fn.qkv.weight", (None, d))
        inner = Wqkv.shape[0]
        p = _heads_dim(inner, heads, f"CRATE layer {i} qkv ({inner} features)")
        w = (h @ Wqkv.T).reshape(b, n + 1, heads, p)  # head index outer in the feature axis
        mssa_proj.append(w.transpose(0, 2, 1, 3))
        o = mssa_heads(w).reshape(b, n + 1, inner)
        if P.has(pre + "0.fn.to_out.0.weight"):
            o = o @ P.get(pre + "0.fn.to_out.0.weight", (d, inner)).T + P.get(
                pre + "0.fn.to_out.0.bias", (d,)
            )
        elif not (heads == 1 and inner == d):
            raise KeyError(
                f"CRATE state_dict: missing '{pre}0.fn.to_out.0.weight' (only heads == 1 with "
                f"dim_head == dim has an identity output projection)"
            )
        z = x + o
        y = layer_norm(z, P.get(pre + "1.norm.weight", (d,)), P.get(pre + "1.norm.bias", (d,)),
                       _CRATE_EPS)
        x = crate_ista_block(y, P.get(pre + "1.fn.weight", (d, d)), eta, lmbda)
        ista_out.append(x)
    return {"tokens": x, "mssa_proj": mssa_proj, "ista_out": ista_out, "params": P}


def crate_forward(sd, images_nchw, *, patch, heads, pool="cls", eta=0.1, lmbda=0.1):
    """CRATE classifier logits (docs/math.md §CRATE).

    Args:
      sd: CRATE torch state_dict (docs/weights.md §Layouts names).
      images_nchw: ``[B, C, H, W]``.
      pool: ``'cls'`` (token 0) or ``'mean'`` (mean over all tokens, cls included).
    Returns:
      ``[B, classes]`` float64 logits: ``LN_1e-5(feat) @ W_h^T + b_h``.
    """
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    out = crate_intermediates(sd, images_nchw, patch=patch, heads=heads, eta=eta, lmbda=lmbda)
    x, P = out["tokens"], out["params"]
    d = x.shape[-1]
    feat = x[:, 0] if pool == "cls" else x.mean(axis=1)
    feat = layer_norm(feat, P.get("mlp_head.0.weight", (d,)), P.get("mlp_head.0.bias", (d,)),
                      _CRATE_EPS)
    Wh = P.get("mlp_head.1.weight", (None, d))
    logits = feat @ Wh.T + P.get("mlp_head.1.bias", (Wh.shape[0],))
    P.check_all_used()
    return logits


# ----------------------------------------------------------------------------------------------
# CRATE-alpha, JAX / big_vision layout (docs/math.md §CRATE-α; docs/weights.md §Layouts)
# ----------------------------------------------------------------------------------------------


def posemb_sincos_2d(h, w, d, temperature=10_000.0):
    """big_vision's fixed 2-D sin-cos table (docs/math.md §Position tables), without the cls row.

    ``omega_i = temperature^(-i/(d/4 - 1))``, ``i = 0..d/4-1``; token ``r*w + c`` (row r,
    column c) gets ``[sin(c omega), cos(c omega), sin(r omega), cos(r omega)]``.

    Returns:
      ``[h*w, d]`` float64.
    """
    if d % 4 or d < 8:
        raise ValueError(f"posemb_sincos_2d needs a width divisible by 4 and >= 8, got {d}")
    q = d // 4
    omega = 1.0 / temperature ** (np.arange(q, dtype=np.float64) / (q - 1))
    rows, cols = np.mgrid[:h, :w]
    c = cols.reshape(-1, 1).astype(np.float64) * omega
    r = rows.reshape(-1, 1).astype(np.float64) * omega
    return np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1)


def _alpha_stem_and_blocks(P, x, *, heads, posemb, eta, lmbda, ln_eps, grid, names):
    """Shared CRATE-alpha body after the patch projection.

    Args:
      P: ``_Params`` view. x: ``[B, N, d]`` patch tokens. grid: ``(h, w)``.
      names: layout-specific name table (see ``_JAX_NAMES``/``_TORCH_NAMES``).
    Returns:
      dict with ``embedded`` ``[B, N+1, d]``, ``blocks`` (per-block outputs), ``mssa_proj``
      (per-block ``[B, N+1, K, p]``), ``odl_codes`` (per-block ``[B, N+1, 4d]``),
      ``encoded`` ``[B, N+1, d]``.
    """
    b, n, d = x.shape
    p = _heads_dim(d, heads, f"{names['what']} width")
    cls = P.get(names["cls"], (1, 1, d))
    x = np.concatenate([np.broadcast_to(cls, (b, 1, d)), x], axis=1)
    if posemb == "learn":
        pos = P.get(names["pos"], (1, n + 1, d))
    elif posemb == "sincos2d":
        pos = np.concatenate([np.zeros((1, d)), posemb_sincos_2d(grid[0], grid[1], d)])[None]
    else:
        raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {posemb!r}")
    x = x + pos
    aux = {"embedded": x, "blocks": [], "mssa_proj": [], "odl_codes": []}

    depth = P.count_blocks(names["block"], names["ln0_scale"])
    for i in range(depth):
        pre = names["block"].format(i)
        y = layer_norm(x, P.get(pre + names["ln0_scale"], (d,)),
                       P.get(pre + names["ln0_bias"], (d,)), ln_eps)
        w = names["proj"](P, pre, y, heads, p)  # [B, N+1, K, p]
        aux["mssa_proj"].append(w)
        y = names["out"](P, pre, mssa_heads(w), heads, p)  # [B, N+1, d]
        ls1 = _layer_scale(P, pre, "ls1", d) if names["layer_scale"] else None
        x = x + (y if ls1 is None else ls1 * y)
        y = layer_norm(x, P.get(pre + names["ln1_scale"], (d,)),
                       P.get(pre + names["ln1_bias"], (d,)), ln_eps)
        D = P.get(pre + names["D"], (d, None))
        D1 = P.get(pre + names["D1"], D.shape)
        a2 = odl_codes(y, D, eta, lmbda)
        aux["odl_codes"].append(a2)
        y = a2 @ D1.T
        ls2 = _layer_scale(P, pre, "ls2", d) if names["layer_scale"] else None
        x = x + (y if ls2 is None else ls2 * y)
        aux["blocks"].append(x)
    aux["encoded"] = x
    return aux


def _layer_scale(P, pre, name, d):
    # flax LayerScale(name='ls1') owns a parameter also named 'ls1' -> '.../ls1/ls1'; accept a
    # bare '.../ls1' too (docs/weights.md §Layouts names only the leaf).
    for key in (f"{pre}{name}/{name}", f"{pre}{name}"):
        if P.has(key):
            return P.get(key, (d,))
    return None


def _jax_proj(P, pre, y, heads, p):
    d = y.shape[-1]
    U = P.get(pre + "MultiHeadDotProductSubspaceAttention_0/proj/kernel", (d, heads, p))
    return np.einsum("bnd,dkp->bnkp", y, U, optimize=True)


def _jax_out(P, pre, o, heads, p):
    Wo = P.get(pre + "MultiHeadDotProductSubspaceAttention_0/out/kernel", (heads, p, None))
    return np.einsum("bnkp,kpd->bnd", o, Wo, optimize=True)


def _torch_proj(P, pre, y, heads, p):
    b, n, d = y.shape
    Wqkv = P.get(pre + "0.fn.qkv.weight", (heads * p, d))
    return (y @ Wqkv.T).reshape(b, n, heads, p)


def _torch_out(P, pre, o, heads, p):
    b, n = o.shape[:2]
    Wo = P.get(pre + "0.fn.to_out.0.weight", (None, heads * p))
    return o.reshape(b, n, heads * p) @ Wo.T


_JAX_NAMES = {
    "what": "CRATE-alpha (JAX layout)",
    "cls": "cls",
    "pos": "pos_embedding",
    "block": "Transformer/encoderblock_{}/",
    "ln0_scale": "LayerNorm_0/scale",
    "ln0_bias": "LayerNorm_0/bias",
    "ln1_scale": "LayerNorm_1/scale",
    "ln1_bias": "LayerNorm_1/bias",
    "D": "OvercompleteISTABlock_0/D",
    "D1": "OvercompleteISTABlock_0/D1",
    "proj": _jax_proj,
    "out": _jax_out,
    "layer_scale": True,
}

_TORCH_NAMES = {
    "what": "CRATE-alpha (torch_inference layout)",
    "cls": "cls_token",
    "pos": "pos_embedding",
    "block": "transformer.layers.{}.",
    "ln0_scale": "0.norm.weight",
    "ln0_bias": "0.norm.bias",
    "ln1_scale": "1.norm.weight",
    "ln1_bias": "1.norm.bias",
    "D": "1.fn.D",
    "D1": "1.fn.D1",
    "proj": _torch_proj,
    "out": _torch_out,
    "layer_scale": False,
}


def _crate_alpha_jax(P, images_nhwc, *, patch, heads, posemb, eta, lmbda, ln_eps, final_eps):
    kernel = P.get("embedding/kernel", (patch, patch, None, None))
    d = kernel.shape[-1]
    bias = P.get_optional("embedding/bias", (d,))
    x = conv_stem_hwio(images_nhwc, kernel, bias, patch)
    grid = (images_nhwc.shape[1] // patch, images_nhwc.shape[2] // patch)
    aux = _alpha_stem_and_blocks(P, x, heads=heads, posemb=posemb, eta=eta, lmbda=lmbda,
                                 ln_eps=ln_eps, grid=grid, names=_JAX_NAMES)
    normed = layer_norm(aux["encoded"], P.get("encoder_norm/scale", (d,)),
                        P.get("encoder_norm/bias", (d,)), final_eps)
    feat = normed[:, 0]  # always the cls token (pool_type is ignored, docs/math.md §CRATE-α)
    aux["pre_logits"] = feat
    if P.has("head/kernel"):
        Wh = P.get("head/kernel", (d, None))
        out = feat @ Wh
        hb = P.get_optional("head/bias", (Wh.shape[1],))
        if hb is not None:
            out = out + hb
    else:
        out = feat
    aux["out"] = out
    P.check_all_used()
    return aux


def crate_alpha_forward_jax(params, images_nhwc, *, patch, heads, posemb="learn", eta=0.1,
                            lmbda=0.1, ln_eps=1e-6, final_eps=1e-6, return_tokens=False):
    """CRATE-alpha forward in the JAX/big_vision layout (docs/math.md §CRATE-α, parameter paths of 2.4).

    Args:
      params: flat dict with the '/' paths of docs/weights.md §Layouts (no ``params/`` prefix).
        ``embedding/bias`` and ``head/bias`` are optional (absent = no bias). With
        ``posemb='sincos2d'`` there must be no ``pos_embedding``. Without ``head/kernel`` the
        pooled features are returned.
      images_nhwc: ``[B, H, W, C]``.
      ln_eps: eps of the block LayerNorms; final_eps: eps of ``encoder_norm``.
      return_tokens: also return a dict of intermediates.
    Returns:
      ``[B, classes]`` logits (or ``[B, d]`` pooled cls features after ``encoder_norm`` when
      there is no head). With ``return_tokens=True``: ``(out, aux)`` where ``aux`` has
      ``embedded`` ``[B, N+1, d]`` (cls + patches + pos), ``blocks`` (list of per-block outputs
      ``[B, N+1, d]``), ``mssa_proj`` (list of ``[B, N+1, K, p]``), ``odl_codes`` (list of
      ``[B, N+1, 4d]``), ``encoded`` ``[B, N+1, d]`` (before ``encoder_norm``; tokens 1: are
      the official ``pre_logits_2d``) and ``pre_logits`` ``[B, d]``.
    """
    P = _Params(params, "CRATE-alpha params (JAX layout)")
    aux = _crate_alpha_jax(P, np.asarray(images_nhwc, np.float64), patch=patch, heads=heads,
                           posemb=posemb, eta=eta, lmbda=lmbda, ln_eps=ln_eps, final_eps=final_eps)
    out = aux.pop("out")
    return (out, aux) if return_tokens else out


# ----------------------------------------------------------------------------------------------
# CRATE-alpha, torch_inference layout (docs/weights.md §Layouts)
# ----------------------------------------------------------------------------------------------


def crate_alpha_forward_torch(sd, images_nchw, *, patch, heads, eta=0.1, lmbda=0.1,
                              final_eps=1e-5):
    """CRATE-alpha forward in the torch_inference layout (docs/weights.md §Layouts, names of 2.5).

    Block LayerNorms use eps 1e-6; the final ``mlp_head.0`` LayerNorm uses ``final_eps``
    (torch default 1e-5 in the official port) and is applied to the cls token.

    Args:
      sd: state_dict with the names of docs/weights.md §Layouts.
      images_nchw: ``[B, C, H, W]``.
    Returns:
      ``[B, classes]`` float64 logits.
    """
    P = _Params(sd, "CRATE-alpha state_dict (torch_inference layout)")
    weight = P.get("conv1.weight", (None, None, patch, patch))
    d = weight.shape[0]
    images = np.asarray(images_nchw, np.float64)
    x = conv_stem_oihw(images, weight, P.get("conv1.bias", (d,)), patch)
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    aux = _alpha_stem_and_blocks(P, x, heads=heads, posemb="learn", eta=eta, lmbda=lmbda,
                                 ln_eps=1e-6, grid=grid, names=_TORCH_NAMES)
    feat = layer_norm(aux["encoded"][:, 0], P.get("mlp_head.0.weight", (d,)),
                      P.get("mlp_head.0.bias", (d,)), final_eps)
    Wh = P.get("mlp_head.1.weight", (None, d))
    logits = feat @ Wh.T + P.get("mlp_head.1.bias", (Wh.shape[0],))
    P.check_all_used()
    return logits


def _as_array(a):
    return a if isinstance(a, np.ndarray) else np.asarray(a)


def crate_alpha_torch_from_jax(params, heads):
    """Map a CRATE-alpha JAX tree to the torch_inference state_dict (docs/weights.md §Layouts).

    Transposes and reshapes only (docs/weights.md §Layouts); dtypes are kept. The torch model always has a conv
    and a head bias: absent JAX biases become zeros.

    Args:
      params: flat JAX-layout dict with a ``pos_embedding`` and a ``head``.
      heads: K (``proj/kernel`` is ``[d, K, p]``).
    Returns:
      dict name -> array in the torch_inference naming.
    """
    P = dict(params)
    for key in ("cls", "pos_embedding", "embedding/kernel", "head/kernel", "encoder_norm/scale"):
        if key not in P:
            raise KeyError(
                f"crate_alpha_torch_from_jax: missing '{key}' (the torch model needs it)"
            )
    kernel = _as_array(P["embedding/kernel"])
    d = kernel.shape[-1]
    head = _as_array(P["head/kernel"])
    sd = {
        "cls_token": _as_array(P["cls"]),
        "pos_embedding": _as_array(P["pos_embedding"]),
        "conv1.weight": kernel.transpose(3, 2, 0, 1),
        "conv1.bias": _as_array(P.get("embedding/bias", np.zeros(d, kernel.dtype))),
    }
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in P:
        src, dst = f"Transformer/encoderblock_{i}/", f"transformer.layers.{i}."
        attn = src + "MultiHeadDotProductSubspaceAttention_0/"
        proj = _as_array(P[attn + "proj/kernel"])
        out = _as_array(P[attn + "out/kernel"])
        if proj.shape[1] != heads:
            raise ValueError(f"{attn}proj/kernel has shape {proj.shape}: {proj.shape[1]} heads, "
                             f"not heads={heads}")
        if any(k.startswith(src + "ls") for k in P):
            raise ValueError(f"{src}: LayerScale parameters have no torch_inference counterpart")
        sd[dst + "0.norm.weight"] = _as_array(P[src + "LayerNorm_0/scale"])
        sd[dst + "0.norm.bias"] = _as_array(P[src + "LayerNorm_0/bias"])
        sd[dst + "0.fn.qkv.weight"] = proj.reshape(d, -1).T
        sd[dst + "0.fn.to_out.0.weight"] = out.reshape(-1, d).T
        sd[dst + "1.norm.weight"] = _as_array(P[src + "LayerNorm_1/scale"])
        sd[dst + "1.norm.bias"] = _as_array(P[src + "LayerNorm_1/bias"])
        sd[dst + "1.fn.D"] = _as_array(P[src + "OvercompleteISTABlock_0/D"])
        sd[dst + "1.fn.D1"] = _as_array(P[src + "OvercompleteISTABlock_0/D1"])
        i += 1
    sd["mlp_head.0.weight"] = _as_array(P["encoder_norm/scale"])
    sd["mlp_head.0.bias"] = _as_array(P["encoder_norm/bias"])
    sd["mlp_head.1.weight"] = head.T
    sd["mlp_head.1.bias"] = _as_array(P.get("head/bias", np.zeros(head.shape[1], head.dtype)))
    return sd


def crate_alpha_jax_from_torch(sd, heads):
    """Inverse of ``crate_alpha_torch_from_jax``: torch_inference state_dict -> JAX paths.

    Args:
      sd: dict with the names of docs/weights.md §Layouts. heads: K.
    Returns:
      flat JAX-layout dict (with ``embedding/bias`` and ``head/bias``, as the torch model has
      them).
    """
    S = dict(sd)
    for key in ("cls_token", "pos_embedding", "conv1.weight", "mlp_head.1.weight"):
        if key not in S:
            raise KeyError(f"crate_alpha_jax_from_torch: missing '{key}'")
    w = _as_array(S["conv1.weight"])
    d = w.shape[0]
    p = _heads_dim(d, heads, "crate_alpha_jax_from_torch")
    params = {
        "cls": _as_array(S["cls_token"]),
        "pos_embedding": _as_array(S["pos_embedding"]),
        "embedding/kernel": w.transpose(2, 3, 1, 0),
        "embedding/bias": _as_array(S["conv1.bias"]),
    }
    i = 0
    while f"transformer.layers.{i}.0.norm.weight" in S:
        src, dst = f"transformer.layers.{i}.", f"Transformer/encoderblock_{i}/"
        attn = dst + "MultiHeadDotProductSubspaceAttention_0/"
        params[dst + "LayerNorm_0/scale"] = _as_array(S[src + "0.norm.weight"])
        params[dst + "LayerNorm_0/bias"] = _as_array(S[src + "0.norm.bias"])
        params[attn + "proj/kernel"] = _as_array(S[src + "0.fn.qkv.weight"]).T.reshape(d, heads, p)
        to_out = _as_array(S[src + "0.fn.to_out.0.weight"])
        params[attn + "out/kernel"] = to_out.T.reshape(heads, p, d)
        params[dst + "LayerNorm_1/scale"] = _as_array(S[src + "1.norm.weight"])
        params[dst + "LayerNorm_1/bias"] = _as_array(S[src + "1.norm.bias"])
        params[dst + "OvercompleteISTABlock_0/D"] = _as_array(S[src + "1.fn.D"])
        params[dst + "OvercompleteISTABlock_0/D1"] = _as_array(S[src + "1.fn.D1"])
        i += 1
    params["encoder_norm/scale"] = _as_array(S["mlp_head.0.weight"])
    params["encoder_norm/bias"] = _as_array(S["mlp_head.0.bias"])
    params["head/kernel"] = _as_array(S["mlp_head.1.weight"]).T
    params["head/bias"] = _as_array(S["mlp_head.1.bias"])
    return params


# ----------------------------------------------------------------------------------------------
# CLIPA two-tower (docs/math.md §CLIPA, §Contrastive loss)
# ----------------------------------------------------------------------------------------------


def clipa_text_forward(params, tokens, *, heads, ln_eps=1e-6):
    """CLIPA text tower (docs/math.md §CLIPA): plain pre-LN transformer, no mask, last-position pooling.

    Args:
      params: flat dict with ``txt/...`` names (other prefixes are ignored).
      tokens: ``[B, L]`` integer ids, ``L`` = rows of ``txt/pos_embedding``.
      heads: K of the text attention.
    Returns:
      ``[B, out_dim]`` unnormalised text embeddings (``head`` has no bias).
    """
    P = _Params(params, "CLIPA text tower", prefix="txt/")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"tokens must be a [B, L] integer array, got {tokens.dtype} {tokens.shape}"
        )
    table = P.get("Embed_0/embedding", (None, None))
    vocab, w = table.shape
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(
            f"token ids must lie in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]"
        )
    b, length = tokens.shape
    x = table[tokens] + P.get("pos_embedding", (1, length, w))
    p = _heads_dim(w, heads, "CLIPA text tower width")
    depth = P.count_blocks("Transformer/encoderblock_{}/", "LayerNorm_0/scale")
    for i in range(depth):
        pre = f"Transformer/encoderblock_{i}/"
        att = pre + "MultiHeadDotProductAttention_0/"
        y = layer_norm(x, P.get(pre + "LayerNorm_0/scale", (w,)),
                       P.get(pre + "LayerNorm_0/bias", (w,)), ln_eps)
        q, k, v = (
            np.einsum("bnw,wkp->bnkp", y, P.get(att + f"{n}/kernel", (w, heads, p)), optimize=True)
            + P.get(att + f"{n}/bias", (heads, p))
            for n in ("query", "key", "value")
        )
        o = attention_heads(q, k, v)
        y = np.einsum("bnkp,kpw->bnw", o, P.get(att + "out/kernel", (heads, p, w)), optimize=True)
        y = y + P.get(att + "out/bias", (w,))
        x = x + y
        y = layer_norm(x, P.get(pre + "LayerNorm_1/scale", (w,)),
                       P.get(pre + "LayerNorm_1/bias", (w,)), ln_eps)
        mlp = pre + "MlpBlock_0/"
        W0 = P.get(mlp + "Dense_0/kernel", (w, None))
        hidden = gelu_tanh(y @ W0 + P.get(mlp + "Dense_0/bias", (W0.shape[1],)))
        y = hidden @ P.get(mlp + "Dense_1/kernel", (W0.shape[1], w))
        y = y + P.get(mlp + "Dense_1/bias", (w,))
        x = x + y
    x = layer_norm(x, P.get("encoder_norm/scale", (w,)), P.get("encoder_norm/bias", (w,)), ln_eps)
    out = x[:, -1] @ P.get("head/kernel", (w, None))  # pool_type='last'
    P.check_all_used()
    return out


def l2_normalise(z):
    """``z / (||z||_2 + 1e-8)`` along the last axis (docs/math.md §CLIPA)."""
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


def clipa_embeddings(params, images_nhwc, tokens, *, img_patch, img_heads, txt_heads):
    """CLIPA two-tower embeddings (docs/math.md §CLIPA).

    Args:
      params: flat dict with ``img/...`` (CRATE-alpha, JAX layout, normally without conv and
        head biases; a missing ``img/pos_embedding`` means the fixed sincos-2d table),
        ``txt/...`` and ``t`` (shape ``(1,)``, a log-scale).
      images_nhwc: ``[B, H, W, C]`` (already normalised). tokens: ``[B, L]``.
    Returns:
      ``(zimg [B, E], ztxt [B, E], t)``: L2-normalised embeddings and ``t = exp(params['t'])``
      as a float.
    """
    if "t" not in params:
        raise KeyError("CLIPA params: missing 't' (the log temperature, shape (1,))")
    Pimg = _Params(params, "CLIPA image tower", prefix="img/")
    posemb = "learn" if Pimg.has("pos_embedding") else "sincos2d"
    aux = _crate_alpha_jax(Pimg, np.asarray(images_nhwc, np.float64), patch=img_patch,
                           heads=img_heads, posemb=posemb,
                           eta=0.1, lmbda=0.1, ln_eps=1e-6, final_eps=1e-6)
    zimg = l2_normalise(aux["out"])
    ztxt = l2_normalise(clipa_text_forward(params, tokens, heads=txt_heads))
    t = float(np.exp(np.asarray(params["t"], np.float64)).reshape(-1)[0])
    return zimg, ztxt, t


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def contrastive_loss(zimg, ztxt, t):
    """Bidirectional contrastive loss (docs/math.md §Contrastive loss).

    Args:
      zimg, ztxt: ``[B, E]`` (normalised). t: the logit multiplier ``exp(params['t'])``.
    Returns:
      ``mean_i 1/2 (-log softmax_row(L)_ii - log softmax_col(L)_ii)`` with
      ``L = (zimg @ ztxt^T) t``.
    """
    logits = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T * float(t)
    diag_r = np.diagonal(_log_softmax(logits, 1))
    diag_c = np.diagonal(_log_softmax(logits, 0))
    return float(np.mean(-0.5 * (diag_r + diag_c)))


def sigmoid_loss(zimg, ztxt, t, b):
    """SigLIP loss: ``-1/B sum_ij log sigmoid(l_ij (t <x_i, y_j> + b))``, ``l_ii = 1``, else -1.

    Args:
      zimg, ztxt: ``[B, E]``. t: logit multiplier. b: logit bias.
    Returns:
      float.
    """
    logits = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T * float(t) + float(b)
    labels = 2.0 * np.eye(logits.shape[0]) - 1.0
    # log sigmoid(z) = -log(1 + exp(-z))
    return float(-np.sum(-np.logaddexp(0.0, -labels * logits)) / logits.shape[0])


# ----------------------------------------------------------------------------------------------
# Coding rate and sparsity (docs/math.md §Coding rate)
# ----------------------------------------------------------------------------------------------


def _half_logdet_eye_plus(a, M):
    """``1/2 logdet(I + a M)`` for a symmetric PSD ``M``."""
    sign, logdet = np.linalg.slogdet(np.eye(M.shape[-1]) + a * M)
    if np.any(sign <= 0):
        raise FloatingPointError("I + a Z^T Z is not positive definite (is a negative?)")
    return 0.5 * logdet


def coding_rate(Z, eps):
    """``R(Z) = 1/2 logdet(I_d + d/(N eps^2) Z^T Z)`` for ``Z`` ``[N, d]`` (tokens as rows)."""
    Z = np.asarray(Z, np.float64)
    n, d = Z.shape
    return float(_half_logdet_eye_plus(d / (n * eps**2), Z.T @ Z))


def compression_rate(Z, U_list, eps):
    """``R^c(Z; U_[K]) = sum_k 1/2 logdet(I_p + p/(N eps^2) (Z U_k)^T (Z U_k))`` (docs/math.md §Coding rate).

    Args:
      Z: ``[N, d]`` tokens as rows. U_list: K arrays ``[d, p]``.
    """
    Z = np.asarray(Z, np.float64)
    n = Z.shape[0]
    total = 0.0
    for U in U_list:
        W = Z @ np.asarray(U, np.float64)  # [N, p]
        p = W.shape[1]
        total += _half_logdet_eye_plus(p / (n * eps**2), W.T @ W)
    return float(total)


def official_compression(X, eps=0.01):
    """The compression measurement of CRATE's ``vis_utils`` (docs/math.md §Coding rate).

    Args:
      X: ``[B, K, N, p]`` the MSSA projections of one layer (cls included).
      eps: plays the role of epsilon^2 (official 0.01).
    Returns:
      ``(mean_b R_b, std_b R_b)`` with ``R_b = 1/2 sum_k logdet(I_N + p/(N eps) X_bk X_bk^T)``
      after scaling every token's p-vector to unit norm; the std is torch's unbiased one
      (nan for B = 1, as in torch).
    """
    X = np.asarray(X, np.float64)
    b, k, n, p = X.shape
    X = X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)  # F.normalize
    gram = X @ X.swapaxes(-1, -2)  # [B, K, N, N]
    sign, logdet = np.linalg.slogdet(np.eye(n) + p / (n * eps) * gram)
    R = 0.5 * logdet.sum(axis=1)  # [B]
    std = float(np.std(R, ddof=1)) if b > 1 else float("nan")
    return float(R.mean()), std


def official_sparsity(Z):
    """The sparsity measurement of CRATE's ``vis_utils`` (docs/math.md §Coding rate).

    Args:
      Z: ``[B, N, d]`` the ISTA block output of one layer.
    Returns:
      ``(mean_b s_b, std_b s_b)``, ``s_b`` = fraction of exact zeros of sample b, population std.
      Note the official plot shows ``1 - mean``, the fraction of non-zero entries.
    """
    Z = np.asarray(Z)
    s = (Z.reshape(Z.shape[0], -1) == 0).mean(axis=1)
    return float(s.mean()), float(s.std(ddof=0))


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling (docs/math.md §Position tables)
# ----------------------------------------------------------------------------------------------


def resample_posemb_2d(pos, new_h, new_w, *, old_hw=None):
    """big_vision ``crate.resample_posemb``: resample the grid part, keep the cls row.

    The grid is resized with ``scipy.ndimage.zoom(order=1)`` and zoom factors ``new/old`` per
    axis, as the official loader does (it only handles square grids; ``old_hw`` lets a caller
    name a non-square old grid).

    Args:
      pos: ``[1, 1 + h*w, d]``. new_h, new_w: the new grid.
    Returns:
      ``[1, 1 + new_h*new_w, d]`` float64.
    """
    pos = np.asarray(pos, np.float64)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos must be [1, 1+h*w, d], got {pos.shape}")
    n, d = pos.shape[1] - 1, pos.shape[2]
    if old_hw is None:
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"pos has {n} grid rows, not a square grid; pass old_hw=(h, w)")
        old_hw = (g, g)
    oh, ow = old_hw
    if oh * ow != n:
        raise ValueError(f"old_hw={old_hw} does not match the {n} grid rows of pos")
    if (oh, ow) == (new_h, new_w):
        return pos.copy()
    grid = pos[0, 1:].reshape(oh, ow, d)
    grid = scipy.ndimage.zoom(grid, (new_h / oh, new_w / ow, 1), order=1)
    if grid.shape[:2] != (new_h, new_w):
        raise ValueError(f"zoom produced a {grid.shape[:2]} grid, wanted {(new_h, new_w)}")
    return np.concatenate([pos[:, :1], grid.reshape(1, new_h * new_w, d)], axis=1)


def resample_posemb_1d(pos, new_len):
    """CLIPA's ``jax.image.resize(pos, (1, new_len, d), 'bilinear')`` (docs/math.md §Position tables), upsampling only.

    Linear interpolation along the flattened token axis (cls row included), half-pixel centres:
    output ``i`` samples input coordinate ``(i + 0.5) L/new_len - 0.5``, clamped to
    ``[0, L-1]`` (what jax's weight normalisation at the borders amounts to when upsampling).

    Args:
      pos: ``[1, L, d]``. new_len: ``>= L``.
    Returns:
      ``[1, new_len, d]`` float64.
    """
    pos = np.asarray(pos, np.float64)
    length = pos.shape[1]
    if new_len < length:
        raise ValueError(f"resample_posemb_1d only upsamples ({length} -> {new_len} requested); "
                         f"downsampling would need jax's antialiased kernel")
    coord = np.clip((np.arange(new_len) + 0.5) * length / new_len - 0.5, 0.0, length - 1)
    lo = np.floor(coord).astype(int)
    hi = np.minimum(lo + 1, length - 1)
    frac = (coord - lo)[None, :, None]
    return (1.0 - frac) * pos[:, lo] + frac * pos[:, hi]


# ----------------------------------------------------------------------------------------------
# Official-layout random weights and shape tables
# ----------------------------------------------------------------------------------------------
# Each table maps name -> (shape, init), where init is one of
#   ("scale",)      LayerNorm scale: 1 + 0.1 N(0, 1)
#   ("shift",)      LayerNorm bias / any bias: 0.1 N(0, 1)
#   ("normal", s)   N(0, s^2)
# The scales keep activations O(1) and the ReLU/ISTA codes partly active (see the self-check).


def _fill(rng, table, shapes_only):
    if shapes_only:
        return {k: tuple(shape) for k, (shape, _) in table.items()}
    rng = np.random.default_rng(rng)
    out = {}
    for k, (shape, init) in table.items():
        z = rng.standard_normal(shape)
        if init[0] == "scale":
            out[k] = 1.0 + 0.1 * z
        elif init[0] == "shift":
            out[k] = 0.1 * z
        else:
            out[k] = init[1] * z
    return out


def param_count(tree):
    """Total number of scalars in a dict of arrays or of shape tuples."""
    return int(sum(math.prod(v if isinstance(v, tuple) else np.shape(v)) for v in tree.values()))


def _crate_table(*, dim, depth, heads, patch, image_size, num_classes, channels):
    f = patch * patch * channels
    n = (image_size // patch) ** 2
    inner = dim  # dim_head = dim / heads in every preset
    _heads_dim(dim, heads, "random_crate_state_dict")
    t = {
        "pos_embedding": ((1, n + 1, dim), ("normal", 0.5)),
        "cls_token": ((1, 1, dim), ("normal", 0.5)),
        "to_patch_embedding.1.weight": ((f,), ("scale",)),
        "to_patch_embedding.1.bias": ((f,), ("shift",)),
        "to_patch_embedding.2.weight": ((dim, f), ("normal", f**-0.5)),
        "to_patch_embedding.2.bias": ((dim,), ("shift",)),
        "to_patch_embedding.3.weight": ((dim,), ("scale",)),
        "to_patch_embedding.3.bias": ((dim,), ("shift",)),
    }
    for i in range(depth):
        pre = f"transformer.layers.{i}."
        t[pre + "0.norm.weight"] = ((dim,), ("scale",))
        t[pre + "0.norm.bias"] = ((dim,), ("shift",))
        t[pre + "0.fn.qkv.weight"] = ((inner, dim), ("normal", dim**-0.5))
        if heads != 1:  # heads == 1 and dim_head == dim: identity output (docs/math.md §CRATE)
            t[pre + "0.fn.to_out.0.weight"] = ((dim, inner), ("normal", inner**-0.5))
            t[pre + "0.fn.to_out.0.bias"] = ((dim,), ("shift",))
        t[pre + "1.norm.weight"] = ((dim,), ("scale",))
        t[pre + "1.norm.bias"] = ((dim,), ("shift",))
        t[pre + "1.fn.weight"] = ((dim, dim), ("normal", dim**-0.5))
    t["mlp_head.0.weight"] = ((dim,), ("scale",))
    t["mlp_head.0.bias"] = ((dim,), ("shift",))
    t["mlp_head.1.weight"] = ((num_classes, dim), ("normal", dim**-0.5))
    t["mlp_head.1.bias"] = ((num_classes,), ("shift",))
    return t


def random_crate_state_dict(rng, *, dim, depth, heads, patch, image_size, num_classes, channels=3,
                            shapes_only=False):
    """Random CRATE state_dict with the names and shapes of docs/weights.md §Layouts.

    Args:
      rng: seed or ``np.random.Generator`` (ignored with ``shapes_only``).
      shapes_only: return ``{name: shape}`` without allocating anything.
    Returns:
      dict name -> float64 array (or shape tuple).
    """
    table = _crate_table(dim=dim, depth=depth, heads=heads, patch=patch, image_size=image_size,
                         num_classes=num_classes, channels=channels)
    return _fill(rng, table, shapes_only)


def _alpha_table(*, dim, depth, heads, patch, image_size, num_classes, posemb, bias, ratio,
                 channels, prefix=""):
    p = _heads_dim(dim, heads, "random_crate_alpha_jax")
    n = (image_size // patch) ** 2
    m = ratio * dim
    fan_in = patch * patch * channels
    t = {prefix + "cls": ((1, 1, dim), ("normal", 0.5))}
    if posemb == "learn":
        t[prefix + "pos_embedding"] = ((1, n + 1, dim), ("normal", 0.5))
    elif posemb != "sincos2d":
        raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {posemb!r}")
    t[prefix + "embedding/kernel"] = ((patch, patch, channels, dim), ("normal", fan_in**-0.5))
    if bias:
        t[prefix + "embedding/bias"] = ((dim,), ("shift",))
    for i in range(depth):
        pre = f"{prefix}Transformer/encoderblock_{i}/"
        attn = pre + "MultiHeadDotProductSubspaceAttention_0/"
        t[pre + "LayerNorm_0/scale"] = ((dim,), ("scale",))
        t[pre + "LayerNorm_0/bias"] = ((dim,), ("shift",))
        t[attn + "proj/kernel"] = ((dim, heads, p), ("normal", dim**-0.5))
        t[attn + "out/kernel"] = ((heads, p, dim), ("normal", dim**-0.5))
        t[pre + "LayerNorm_1/scale"] = ((dim,), ("scale",))
        t[pre + "LayerNorm_1/bias"] = ((dim,), ("shift",))
        # D large enough that the second ISTA step differs visibly from the first; D1 sized so
        # the ODL output is O(1) next to the residual stream.
        t[pre + "OvercompleteISTABlock_0/D"] = ((dim, m), ("normal", 2.0 * dim**-0.5))
        t[pre + "OvercompleteISTABlock_0/D1"] = ((dim, m), ("normal", 3.0 * m**-0.5))
    t[prefix + "encoder_norm/scale"] = ((dim,), ("scale",))
    t[prefix + "encoder_norm/bias"] = ((dim,), ("shift",))
    if num_classes:
        t[prefix + "head/kernel"] = ((dim, num_classes), ("normal", dim**-0.5))
        if bias:
            t[prefix + "head/bias"] = ((num_classes,), ("shift",))
    return t


def random_crate_alpha_jax(rng, *, dim, depth, heads, patch, image_size, num_classes,
                           posemb="learn", bias=True, ratio=4, channels=3, shapes_only=False):
    """Random CRATE-alpha tree with the flat '/' paths and shapes of docs/weights.md §Layouts.

    Args:
      rng: seed or ``np.random.Generator``.
      num_classes: head width; 0 or None for no head.
      posemb: ``'learn'`` (with ``pos_embedding``) or ``'sincos2d'`` (without).
      bias: ``emb_head_bias`` (conv and head biases).
      ratio: ODL overcompleteness (the official model hard-codes 4).
      shapes_only: return ``{name: shape}`` without allocating.
    Returns:
      dict path -> float64 array (or shape tuple).
    """
    table = _alpha_table(dim=dim, depth=depth, heads=heads, patch=patch, image_size=image_size,
                         num_classes=num_classes, posemb=posemb, bias=bias, ratio=ratio,
                         channels=channels)
    return _fill(rng, table, shapes_only)


def random_clipa_two_tower(rng, *, img_dim, img_depth, img_heads, patch, image_size, out_dim,
                           txt_dim, txt_depth, txt_heads, txt_mlp, vocab, txt_len,
                           shapes_only=False):
    """Random CLIPA two-tower tree with the names and shapes of docs/math.md §CLIPA.

    The image tower is CRATE-alpha with a learned ``img/pos_embedding``, no conv bias and a
    bias-free head of width ``out_dim``; the text tower is the plain transformer of docs/math.md §CLIPA
    with a bias-free ``txt/head``; ``t`` has shape ``(1,)`` (around ``log(1/0.07)``).

    Returns:
      dict path -> float64 array (or shape tuple with ``shapes_only``).
    """
    table = _alpha_table(dim=img_dim, depth=img_depth, heads=img_heads, patch=patch,
                         image_size=image_size, num_classes=out_dim, posemb="learn", bias=False,
                         ratio=4, channels=3, prefix="img/")
    p = _heads_dim(txt_dim, txt_heads, "random_clipa_two_tower text")
    w = txt_dim
    table["t"] = ((1,), ("normal", 0.1))  # shifted to log(1/0.07) below
    table["txt/Embed_0/embedding"] = ((vocab, w), ("normal", 1.0))
    table["txt/pos_embedding"] = ((1, txt_len, w), ("normal", 0.5))
    for i in range(txt_depth):
        pre = f"txt/Transformer/encoderblock_{i}/"
        att = pre + "MultiHeadDotProductAttention_0/"
        table[pre + "LayerNorm_0/scale"] = ((w,), ("scale",))
        table[pre + "LayerNorm_0/bias"] = ((w,), ("shift",))
        for name in ("query", "key", "value"):
            table[att + f"{name}/kernel"] = ((w, txt_heads, p), ("normal", w**-0.5))
            table[att + f"{name}/bias"] = ((txt_heads, p), ("shift",))
        table[att + "out/kernel"] = ((txt_heads, p, w), ("normal", w**-0.5))
        table[att + "out/bias"] = ((w,), ("shift",))
        table[pre + "LayerNorm_1/scale"] = ((w,), ("scale",))
        table[pre + "LayerNorm_1/bias"] = ((w,), ("shift",))
        table[pre + "MlpBlock_0/Dense_0/kernel"] = ((w, txt_mlp), ("normal", w**-0.5))
        table[pre + "MlpBlock_0/Dense_0/bias"] = ((txt_mlp,), ("shift",))
        table[pre + "MlpBlock_0/Dense_1/kernel"] = ((txt_mlp, w), ("normal", txt_mlp**-0.5))
        table[pre + "MlpBlock_0/Dense_1/bias"] = ((w,), ("shift",))
    table["txt/encoder_norm/scale"] = ((w,), ("scale",))
    table["txt/encoder_norm/bias"] = ((w,), ("shift",))
    table["txt/head/kernel"] = ((w, out_dim), ("normal", w**-0.5))
    out = _fill(rng, table, shapes_only)
    if not shapes_only:
        out["t"] = out["t"] + math.log(1 / 0.07)
    return out

