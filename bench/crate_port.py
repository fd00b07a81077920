"""A straightforward JAX port of the torch CRATE classifier (docs/math.md §CRATE), the yardstick of `vs_official.py`.

It is written the way a first port of `model/crate.py` would be: a dict of arrays in the torch layout
(`Linear` weights `[out, in]`), one Python loop over the layers, textbook two-pass LayerNorms,
attention in the torch `[B, K, N, p]` layout with an explicit softmax, and a plain optax step. Nothing
in it is tuned; `vs_official.py` times it next to our train step and the torch original, and
`tests/test_compiled_bytes.py` compares the bytes its gradient moves with ours.

    params = init_params(jax.random.key(0), CrateDims())           # CRATE-T/16 at 224 px
    logits = forward(params, images_nhwc, CrateDims())
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class CrateDims:
    """CRATE-T/16 at 224 px by default (docs/math.md §Sizes); η = λ = 0.1, LayerNorm eps 1e-5."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    eta: float = 0.1
    lmbda: float = 0.1
    eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


def _linear_init(key, out_dim, in_dim, bias=True):
    """torch nn.Linear default: U(±1/sqrt(fan_in)) for weight and bias."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(in_dim)
    w = jax.random.uniform(kw, (out_dim, in_dim), jnp.float32, -bound, bound)
    return (w, jax.random.uniform(kb, (out_dim,), jnp.float32, -bound, bound)) if bias else (w, None)


def _ln_init(dim):
    return {"weight": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def init_params(key, dims: CrateDims) -> dict:
    """torch-layout parameters (docs/weights.md §Layouts names, flattened into nested dicts)."""
    d = dims.dim
    keys = iter(jax.random.split(key, 4 + 3 * dims.depth))
    w_e, b_e = _linear_init(next(keys), d, dims.patch_dim)
    w_h, b_h = _linear_init(next(keys), dims.num_classes, d)
    layers = []
    for _ in range(dims.depth):
        qkv, _ = _linear_init(next(keys), d, d, bias=False)
        out_w, out_b = _linear_init(next(keys), d, d)
        ista = jax.random.uniform(next(keys), (d, d), jnp.float32, -math.sqrt(6.0 / d), math.sqrt(6.0 / d))
        layers.append({"ln1": _ln_init(d), "qkv": qkv, "out_w": out_w, "out_b": out_b, "ln2": _ln_init(d),
                       "ista": ista})
    return {"patch_ln": _ln_init(dims.patch_dim), "embed_w": w_e, "embed_b": b_e, "embed_ln": _ln_init(d),
            "cls": jax.random.normal(next(keys), (1, 1, d), jnp.float32),
            "pos": jax.random.normal(next(keys), (1, dims.num_patches + 1, d), jnp.float32),
            "layers": layers, "head_ln": _ln_init(d), "head_w": w_h, "head_b": b_h}


def layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["weight"] + p["bias"]


def attention(h, layer, heads):
    """MSSA (docs/math.md §CRATE): q = k = v = h U, softmax over keys, output Linear with bias."""
    B, N, d = h.shape
    w = (h @ layer["qkv"].T).reshape(B, N, heads, d // heads).transpose(0, 2, 1, 3)  # [B, K, N, p]
    dots = w @ jnp.swapaxes(w, -1, -2) * (d // heads) ** -0.5
    out = jax.nn.softmax(dots, axis=-1) @ w
    out = out.transpose(0, 2, 1, 3).reshape(B, N, d)
    return out @ layer["out_w"].T + layer["out_b"]


def ista(y, W, eta, lmbda):
    """ISTA (docs/math.md §CRATE): `ReLU(y + η (y W − (y Wᵀ) W) − ηλ)`, torch's F.linear order."""
    x1 = y @ W.T
    grad_1 = x1 @ W
    grad_2 = y @ W
    return jax.nn.relu(y + eta * (grad_2 - grad_1) - eta * lmbda)


def forward(params, images, dims: CrateDims):
    """`images [B, H, W, C]` (normalised) -> logits `[B, num_classes]`."""
    B, H, W, C = images.shape
    P = dims.patch
    x = images.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, P * P * C)
    x = layer_norm(x, params["patch_ln"], dims.eps)
    x = layer_norm(x @ params["embed_w"].T + params["embed_b"], params["embed_ln"], dims.eps)
    cls = jnp.broadcast_to(params["cls"], (B, 1, dims.dim))
    x = jnp.concatenate([cls, x], axis=1) + params["pos"]
    for layer in params["layers"]:
        z = attention(layer_norm(x, layer["ln1"], dims.eps), layer, dims.heads) + x
        x = ista(layer_norm(z, layer["ln2"], dims.eps), layer["ista"], dims.eta, dims.lmbda)
    feat = layer_norm(x[:, 0], params["head_ln"], dims.eps)
    return feat @ params["head_w"].T + params["head_b"]


def loss_fn(params, images, labels, dims: CrateDims):
    logits = forward(params, images, dims)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def optimizer(lr=1e-3, b2=0.95, wd=0.1, clip=1.0):
    """Clip → Adam → decoupled weight decay on matrices → learning rate (the same work as our step)."""
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(b1=0.9, b2=b2),
                       optax.add_decayed_weights(wd, mask=decay), optax.scale(-lr))


def make_step(dims: CrateDims, tx):
    """`step(params, opt_state, images, labels) -> (params, opt_state, loss)`, jitted, state donated."""
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, dims)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(step, donate_argnums=(0, 1))
