"""A float64 numpy forward pass of the official DINO / SimDINO `VisionTransformer` (the backbone: `forward`
returns the final-LN cls token), written from its definition and taking the official state dict as is:

* `prepare_tokens`: `Conv2d(C, d, P, stride P)` on NCHW images, flattened row-major over the patch grid,
  the cls token prepended, plus `interpolate_pos_encoding` (the table as stored for the training size; for
  other sizes torch bicubic with `scale_factor = (g′ + 0.1)/g`, a = −0.75, align_corners False);
* each block: `x += proj(attn(norm1(x)))`, `x += fc2(GELU_erf(fc1(norm2(x))))`, attention with one fused
  qkv Linear reshaped `[B, N, 3, K, p]`, scale p^−½;
* `norm` (LayerNorm eps 1e-6) and the cls row.

It shares no code with `crate_jax`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, w, b=None):
    y = x @ np.asarray(w, np.float64).T
    return y if b is None else y + b


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _cubic(x, a=-0.75):
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic(img, scale):
    """torch `interpolate(img [C, H, W], scale_factor=(scale, scale), mode='bicubic')`, 2-D taps."""
    C, H, W = img.shape
    oh, ow = int(math.floor(H * scale)), int(math.floor(W * scale))
    out = np.zeros((C, oh, ow))
    for i in range(oh):
        sy = (i + 0.5) / scale - 0.5
        y0 = math.floor(sy)
        for j in range(ow):
            sx = (j + 0.5) / scale - 0.5
            x0 = math.floor(sx)
            acc = np.zeros(C)
            for m in range(-1, 3):
                for n in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), H - 1), min(max(x0 + n, 0), W - 1)
                    acc += _cubic(sy - (y0 + m)) * _cubic(sx - (x0 + n)) * img[:, yy, xx]
            out[:, i, j] = acc
    return out


def pos_table(pos_embed, grid):
    pos = np.asarray(pos_embed, np.float64)
    n = pos.shape[1] - 1
    if n == grid * grid:
        return pos
    g = int(math.sqrt(n))
    d = pos.shape[-1]
    patches = pos[0, 1:].reshape(g, g, d).transpose(2, 0, 1)
    patches = bicubic(patches, (grid + 0.1) / g)
    assert patches.shape[1:] == (grid, grid)
    return np.concatenate([pos[:, :1], patches.transpose(1, 2, 0).reshape(1, grid * grid, d)], axis=1)


def vit_forward(sd, images_nchw, num_heads, depth):
    """`sd`: the official backbone state dict (numpy arrays, no prefixes); images `[B, C, H, W]` (normalised)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(images_nchw, np.float64)
    B, C, H, W = x.shape
    w = sd["patch_embed.proj.weight"]
    d, _, P, _ = w.shape
    gh, gw = H // P, W // P
    patches = x.reshape(B, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P)
    tok = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    cls = np.broadcast_to(sd["cls_token"], (B, 1, d))
    x = np.concatenate([cls, tok], axis=1) + pos_table(sd["pos_embed"], gh)
    K, p = num_heads, d // num_heads
    N = x.shape[1]
    for i in range(depth):
        b = f"blocks.{i}."
        h = layer_norm(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, K, p)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # [B, K, N, p]
        logits = q @ k.transpose(0, 1, 3, 2) * p ** -0.5
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, N, d)
        x = x + linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = layer_norm(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        x = x + linear(gelu(linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                       sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return layer_norm(x, sd["norm.weight"], sd["norm.bias"])[:, 0]


def random_state_dict(rng, *, width, depth, heads, patch, grid, channels=3, mlp_ratio=4, head=None):
    """Random tensors in the official layout (float32, as torch stores them); `head`: None, 'simdino' (the
    projection MLP only) or 'dino' (plus the weight-normalised `last_layer`)."""
    del heads
    d, h = width, mlp_ratio * width
    f = lambda *s, std=0.2: (std * rng.standard_normal(s)).astype(np.float32)
    sd = {"cls_token": f(1, 1, d), "pos_embed": f(1, grid * grid + 1, d),
          "patch_embed.proj.weight": f(d, channels, patch, patch), "patch_embed.proj.bias": f(d),
          "norm.weight": 1 + f(d), "norm.bias": f(d)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + f(d), b + "norm1.bias": f(d), b + "attn.qkv.weight": f(3 * d, d),
                   b + "attn.qkv.bias": f(3 * d), b + "attn.proj.weight": f(d, d), b + "attn.proj.bias": f(d),
                   b + "norm2.weight": 1 + f(d), b + "norm2.bias": f(d), b + "mlp.fc1.weight": f(h, d),
                   b + "mlp.fc1.bias": f(h), b + "mlp.fc2.weight": f(d, h), b + "mlp.fc2.bias": f(d)})
    if head:
        sd.update({"head.mlp.0.weight": f(32, d), "head.mlp.0.bias": f(32), "head.mlp.2.weight": f(32, 32),
                   "head.mlp.2.bias": f(32), "head.mlp.4.weight": f(16, 32), "head.mlp.4.bias": f(16)})
    if head == "dino":
        sd.update({"head.last_layer.weight_g": np.ones((64, 1), np.float32), "head.last_layer.weight_v": f(64, 16)})
    return sd
