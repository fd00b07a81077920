"""Independent float64 numpy reference of CRATE-MAE, written from docs/math.md §CRATE-MAE alone.

It shares no code with `crate_jax`. Parameters are a flat dict named exactly as the official
`model/crate_ae` state_dict (`patch_embed.proj.weight`, `blocks.{i}.layers.0.{0,1}...`,
`decoder_blocks.{i}.layers.0.{0,1}...`, ...). Images are NCHW (the official layout); masks are bool
`[B, L]` with True = removed. Every forward checks that each given tensor was used.
"""

from __future__ import annotations

import math

import numpy as np


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def sincos_table(width, grid):
    """MAE position table (docs/math.md): per token [sin(cω), cos(cω), sin(rω), cos(rω)], ω_i = 10000^(−i/(d/4)), zero
    cls row first; float64 here (the official code rounds to float32)."""
    q = width // 4
    omega = 1.0 / 10000.0 ** (np.arange(q) / q)
    out = [np.zeros(width)]
    for r in range(grid):
        for c in range(grid):
            out.append(np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]))
    return np.stack(out)[None]


class _Used(dict):
    def __init__(self, sd):
        super().__init__({k: np.asarray(v, np.float64) for k, v in sd.items()})
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)

    def check(self, ignore=()):
        left = sorted(set(self) - self.used - set(ignore))
        assert not left, f"unused parameters: {left}"


def patchify_nchw(imgs, p):
    """`(B, C, H, W) -> (B, L, p·p·C)`, features ordered (row-in-patch, col-in-patch, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, p * p * C)


def mssa(P, pre, x, heads):
    """CRATE MSSA (docs/math.md §CRATE): shared U (qkv.weight rows per head), softmax(w wᵀ/sqrt(p)) w, to_out with bias."""
    W = P[pre + "qkv.weight"]  # (K·p, d)
    p = W.shape[0] // heads
    w = (x @ W.T).reshape(x.shape[0], x.shape[1], heads, p).transpose(0, 2, 1, 3)  # (B, K, N, p)
    a = softmax(w @ w.transpose(0, 1, 3, 2) / math.sqrt(p))
    o = (a @ w).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], heads * p)
    return o @ P[pre + "to_out.0.weight"].T + P[pre + "to_out.0.bias"]


def forward(sd, imgs_nchw, mask, *, patch, heads, dec_heads=None, eta=0.1, lmbda=0.5):
    """Per-patch predictions `(B, L, p²·3)` for images `(B, 3, H, W)` and mask `(B, L)` (True = removed)."""
    P = _Used(sd)
    dec_heads = dec_heads or heads
    x = np.asarray(imgs_nchw, np.float64)
    B = x.shape[0]
    # stem: conv P×P stride P with bias == a linear map of the (c, row, col)-flattened patch
    Wc, bc = P["patch_embed.proj.weight"], P["patch_embed.proj.bias"]  # (d, C, P, P)
    d = Wc.shape[0]
    Cn, H = x.shape[1], x.shape[2]
    g = H // patch
    pat = x.reshape(B, Cn, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, Cn * patch * patch)
    t = pat @ Wc.reshape(d, -1).T + bc
    # kept tokens and mask tokens in the original order, cls first, decoder_pos_embed (docs/math.md §CRATE-MAE)
    m = np.asarray(mask, bool)[..., None]
    t = np.where(m, P["mask_token"][0], t)
    z = np.concatenate([np.broadcast_to(P["cls_token"], (B, 1, d)), t], axis=1) + P["decoder_pos_embed"]
    P["pos_embed"]  # present in the state_dict, unused by the forward
    i = 0
    while f"blocks.{i}.layers.0.0.norm.weight" in P:
        pre = f"blocks.{i}.layers.0."
        h = layer_norm(z, P[pre + "0.norm.weight"], P[pre + "0.norm.bias"], 1e-5)
        z = z + mssa(P, pre + "0.fn.", h, heads)
        y = layer_norm(z, P[pre + "1.norm.weight"], P[pre + "1.norm.bias"], 1e-5)
        D = P[pre + "1.fn.weight"]
        z = np.maximum(y + eta * (y @ D - (y @ D.T) @ D) - eta * lmbda, 0.0)  # docs/math.md §CRATE with λ = 0.5
        i += 1
    z = layer_norm(z, P["norm.weight"], P["norm.bias"], 1e-6)
    j = 0
    while f"decoder_blocks.{j}.layers.0.0.norm.weight" in P:
        pre = f"decoder_blocks.{j}.layers.0."
        y = layer_norm(z, P[pre + "0.norm.weight"], P[pre + "0.norm.bias"], 1e-5) @ P[pre + "0.fn.weight"].T
        z = y - mssa(P, pre + "1.fn.", layer_norm(y, P[pre + "1.norm.weight"], P[pre + "1.norm.bias"], 1e-5),
                     dec_heads)
        j += 1
    z = layer_norm(z, P["decoder_norm.weight"], P["decoder_norm.bias"], 1e-6)
    pred = z @ P["decoder_pred.weight"].T + P["decoder_pred.bias"]
    P.check(ignore=("decoder_embed.weight", "decoder_embed.bias"))  # decoder_embed exists and is unused
    return pred[:, 1:]


def loss(pred, imgs_nchw, mask, *, patch, norm_pix_loss=False):
    """docs/math.md §CRATE-MAE: MSE per patch against the patchified image (optionally per-patch normalised with the unbiased
    variance + 1e-6), averaged over removed patches only."""
    target = patchify_nchw(np.asarray(imgs_nchw, np.float64), patch)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per = np.square(pred - target).mean(-1)
    m = np.asarray(mask, np.float64)
    return float((per * m).sum() / m.sum())


def random_masking(noise, ratio):
    """docs/math.md §CRATE-MAE `random_masking` from given noise `(B, L)`: keep the int(L(1−r)) lowest-noise patches."""
    B, Ln = noise.shape
    keep = int(Ln * (1 - ratio))
    mask = np.ones((B, Ln), bool)
    for b in range(B):
        mask[b, np.argsort(noise[b], kind="stable")[:keep]] = False
    return mask


def random_state_dict(seed, *, dim, depth, heads, patch, image_size, dec_depth=None, channels=3):
    """Random official-layout tensors (float64) with randomised LayerNorm parameters and the official fixed
    sincos tables."""
    rng = np.random.default_rng(seed)
    dec_depth = dec_depth or depth
    g = image_size // patch
    n = lambda *s, std=1.0: rng.standard_normal(s) * std
    d = dim
    sd = {
        "cls_token": n(1, 1, d, std=0.5), "mask_token": n(1, 1, d, std=0.5),
        "pos_embed": sincos_table(d, g), "decoder_pos_embed": sincos_table(d, g),
        "patch_embed.proj.weight": n(d, channels, patch, patch, std=(channels * patch * patch) ** -0.5),
        "patch_embed.proj.bias": n(d, std=0.1),
        "norm.weight": 1 + n(d, std=0.2), "norm.bias": n(d, std=0.2),
        "decoder_embed.weight": n(d, d, std=d ** -0.5), "decoder_embed.bias": n(d, std=0.1),
        "decoder_norm.weight": 1 + n(d, std=0.2), "decoder_norm.bias": n(d, std=0.2),
        "decoder_pred.weight": n(patch * patch * channels, d, std=d ** -0.5),
        "decoder_pred.bias": n(patch * patch * channels, std=0.1),
    }
    for i in range(depth):
        pre = f"blocks.{i}.layers.0."
        sd.update({pre + "0.norm.weight": 1 + n(d, std=0.2), pre + "0.norm.bias": n(d, std=0.2),
                   pre + "0.fn.qkv.weight": n(d, d, std=d ** -0.5), pre + "0.fn.to_out.0.weight": n(d, d, std=d ** -0.5),
                   pre + "0.fn.to_out.0.bias": n(d, std=0.1),
                   pre + "1.norm.weight": 1 + n(d, std=0.2), pre + "1.norm.bias": n(d, std=0.2),
                   pre + "1.fn.weight": n(d, d, std=(6 / d) ** 0.5 / 3)})
    for j in range(dec_depth):
        pre = f"decoder_blocks.{j}.layers.0."
        sd.update({pre + "0.norm.weight": 1 + n(d, std=0.2), pre + "0.norm.bias": n(d, std=0.2),
                   pre + "0.fn.weight": n(d, d, std=d ** -0.5),
                   pre + "1.norm.weight": 1 + n(d, std=0.2), pre + "1.norm.bias": n(d, std=0.2),
                   pre + "1.fn.qkv.weight": n(d, d, std=d ** -0.5), pre + "1.fn.to_out.0.weight": n(d, d, std=d ** -0.5),
                   pre + "1.fn.to_out.0.bias": n(d, std=0.1)})
    return sd
