"""Official CLIPA two-tower weights (big_vision `.npz`, docs/math.md §CLIPA) <-> our two-tower tree.

    python -m crate_jax.convert --format clipa-jax --input clipa_l14_84.npz --output bundles/clipa_l14

The file holds flat '/' paths (optionally under `params/`, with `opt/…` / `chrono/…` siblings that
are ignored): `img/…` is a CRATE-α tree (docs/weights.md §Layouts, normally without conv and head biases, the head
being the image projection), `txt/…` the plain text transformer and `t` the log temperature. The
image tower is mapped by `crate_jax.weights.layouts` (format `crate-alpha-jax`); the text tower by
the table below. Sizes are read from the shapes; every tensor is checked before anything is
written, and `to_clipa` maps a tree back bit for bit.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from crate_jax.errors import ConfigError
from crate_jax.models.text import TEXT_VARIANTS, TextConfig
from crate_jax.models.two_tower import TwoTowerConfig
from crate_jax.weights import layouts
from crate_jax.weights.importer import import_tensors
from crate_jax.weights.readers import WeightsError, read_tensors

_BLOCK = "txt/Transformer/encoderblock_{i}/"
_ATT = _BLOCK + "MultiHeadDotProductAttention_0/"
_MLP = _BLOCK + "MlpBlock_0/"


def text_rules(cfg: TextConfig, out_dim: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """`(official name ('{i}' = layer), our path, official per-layer shape)` for the text tower."""
    w, K, m, L = cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.max_len
    p = w // K
    B = ("txt", "encoder", "blocks")
    out = [("txt/Embed_0/embedding", ("txt", "embed", "embedding"), (cfg.vocab_size, w)),
           ("txt/pos_embedding", ("txt", "pos_embedding"), (1, L, w))]
    for ln, ours in (("LayerNorm_0", "ln1"), ("LayerNorm_1", "ln2")):
        out += [(_BLOCK + f"{ln}/{k}", B + (ours, k), (w,)) for k in ("scale", "bias")]
    for n in ("query", "key", "value"):
        out += [(_ATT + f"{n}/kernel", B + ("attn", n, "kernel"), (w, K, p)),
                (_ATT + f"{n}/bias", B + ("attn", n, "bias"), (K, p))]
    out += [(_ATT + "out/kernel", B + ("attn", "out", "kernel"), (K, p, w)),
            (_ATT + "out/bias", B + ("attn", "out", "bias"), (w,)),
            (_MLP + "Dense_0/kernel", B + ("mlp", "fc1", "kernel"), (w, m)),
            (_MLP + "Dense_0/bias", B + ("mlp", "fc1", "bias"), (m,)),
            (_MLP + "Dense_1/kernel", B + ("mlp", "fc2", "kernel"), (m, w)),
            (_MLP + "Dense_1/bias", B + ("mlp", "fc2", "bias"), (w,)),
            ("txt/encoder_norm/scale", ("txt", "encoder_norm", "scale"), (w,)),
            ("txt/encoder_norm/bias", ("txt", "encoder_norm", "bias"), (w,)),
            ("txt/head/kernel", ("txt", "head", "kernel"), (w, out_dim))]
    return out


def _names(official: str, depth: int) -> list[str]:
    return [official.format(i=i) for i in range(depth)] if "{i}" in official else [official]


def normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops a `params/` prefix and the `opt/…`, `chrono/…` entries of training checkpoints."""
    tensors = dict(tensors)
    if any(k.startswith("params/") for k in tensors):
        tensors = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    return tensors


def infer_text_config(tensors: Mapping[str, np.ndarray], source: str) -> tuple[TextConfig, int]:
    """`(text config, out_dim)` from the shapes of the `txt/…` tensors."""
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}

    def need(name, ndim):
        if name not in shapes or len(shapes[name]) != ndim:
            raise WeightsError(f"{source}: expected a {ndim}-D tensor {name!r} in a CLIPA two-tower checkpoint "
                               f"(docs/math.md §CLIPA); got {shapes.get(name, 'nothing')}")
        return shapes[name]

    vocab, w = need("txt/Embed_0/embedding", 2)
    _, L, _ = need("txt/pos_embedding", 3)
    _, K, _ = need(_ATT.format(i=0) + "query/kernel", 3)
    _, m = need(_MLP.format(i=0) + "Dense_0/kernel", 2)
    _, out_dim = need("txt/head/kernel", 2)
    ids = [int(mt.group(1)) for mt in map(re.compile(r"^txt/Transformer/encoderblock_(\d+)/").match, shapes) if mt]
    depth = max(ids) + 1
    name = next((n for n, v in TEXT_VARIANTS.items() if v == (w, depth, K, m)), "custom")
    return TextConfig.build(model="transformer", variant=name, width=w, depth=depth, num_heads=K, mlp_dim=m,
                      vocab_size=vocab, max_len=L, pool="last", pad_mask=False, causal=False), out_dim


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def from_clipa(tensors: Mapping[str, np.ndarray], *, source: str = "weights", dtype=None,
               image_overrides: dict | None = None) -> tuple[TwoTowerConfig, dict]:
    """`(cfg, params)` from a flat dict of official CLIPA tensors; `params` is our nested tree (numpy,
    `dtype` default float32). Raises `WeightsError` listing every missing / unexpected / mis-shaped
    tensor."""
    tensors = normalise_names(tensors)
    if "t" not in tensors:
        raise WeightsError(f"{source}: no 't' (the log temperature, shape (1,)); is this a CLIPA two-tower "
                           f"checkpoint? (first names: {sorted(tensors)[:6]})")
    img = {k[len("img/"):]: v for k, v in tensors.items() if k.startswith("img/")}
    txt = {k: v for k, v in tensors.items() if k.startswith("txt/")}
    other = sorted(k for k in tensors if not (k.startswith("img/") or k.startswith("txt/") or k == "t"))
    tcfg, out_dim = infer_text_config(txt, source)
    expected = {}
    for official, ours, shape in text_rules(tcfg, out_dim):
        for n in _names(official, tcfg.depth):
            expected[n] = shape
    problems = [f"missing {k} (expected {s})" for k, s in expected.items() if k not in txt]
    problems += [f"unexpected {k} {tuple(np.shape(v))}" for k, v in txt.items() if k not in expected]
    problems += [f"{k}: expected {s}, got {tuple(np.shape(txt[k]))}" for k, s in expected.items()
                 if k in txt and tuple(np.shape(txt[k])) != s]
    problems += [f"unexpected {k}" for k in other]
    if np.shape(tensors["t"]) != (1,):
        problems.append(f"t: expected shape (1,), got {np.shape(tensors['t'])}")
    if problems:
        raise WeightsError(f"{source} does not match the CLIPA two-tower layout (docs/math.md §CLIPA):\n  "
                           + "\n  ".join(problems))
    try:
        icfg, img_params = import_tensors("crate-alpha-jax", img, source=f"{source} (img/…)",
                                          **(image_overrides or {}))
    except ConfigError as e:
        raise WeightsError(f"{source}: the img/ tower: {e}") from e
    if icfg.num_classes != out_dim:
        raise WeightsError(f"{source}: img/head/kernel projects to {icfg.num_classes}, txt/head/kernel to {out_dim}; "
                           f"both towers must share the embedding width")
    cfg = TwoTowerConfig(image=icfg, text=tcfg, out_dim=out_dim)
    import jax.numpy as jnp  # bfloat16 by name
    dt = jnp.dtype(dtype or "float32")
    params: dict = {"img": img_params, "txt": {}}
    for official, ours, _ in text_rules(tcfg, out_dim):
        arrays = [np.asarray(txt[n]) for n in _names(official, tcfg.depth)]
        value = np.stack(arrays) if "{i}" in official else arrays[0]
        _set(params, ours, np.ascontiguousarray(value.astype(dt)))
    params["t"] = np.asarray(tensors["t"]).astype(np.float32)
    params["img"] = _cast(params["img"], dt)
    return cfg, params


def _cast(tree, dt):
    if isinstance(tree, Mapping):
        return {k: _cast(v, dt) for k, v in tree.items()}
    return np.ascontiguousarray(np.asarray(tree).astype(dt))


def to_clipa(cfg: TwoTowerConfig, params: Mapping) -> dict[str, np.ndarray]:
    """The official flat CLIPA dict from our tree (exact inverse of `from_clipa`). Only the official
    structure can be written: a transformer text tower, softmax loss (no `b`)."""
    if cfg.text.model != "transformer" or cfg.loss != "softmax":
        raise WeightsError("the CLIPA layout holds a transformer text tower and the softmax loss only; "
                           f"this model has text model {cfg.text.model!r} and loss {cfg.loss!r}")
    out = {f"img/{k}": v for k, v in layouts.from_params("crate-alpha-jax", params["img"], cfg.image).items()}
    for official, ours, _ in text_rules(cfg.text, cfg.out_dim):
        node = params
        for k in ours:
            node = node[k]
        value = np.asarray(node)
        parts = list(value) if "{i}" in official else [value]
        for n, part in zip(_names(official, cfg.text.depth), parts):
            out[n] = np.ascontiguousarray(part)
    out["t"] = np.asarray(params["t"])
    return out


def import_clipa(path, **kw) -> tuple[TwoTowerConfig, dict]:
    """`(cfg, params)` from a CLIPA checkpoint file (`.npz` or `.safetensors`)."""
    return from_clipa(read_tensors(path), source=str(path), **kw)
