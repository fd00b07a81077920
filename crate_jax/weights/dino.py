"""Official DINO / SimDINO ViT weights (`facebookresearch/dino`, `RobinWu218/SimDINO`, `vision_transformer.py`)
-> a headless ViT classifier bundle (`num_classes = 0`, the DINO flavour: `init='dino'`, `gelu='erf'`,
`pos_resize='dino'`, LayerNorm eps 1e-6), which the probes, `predict` and fine-tuning take.

Accepted files (`.pth`/`.pt`, `.npz`, `.safetensors`):

* a training checkpoint `{'student': ..., 'teacher': ..., 'optimizer': ..., 'args': ...}`: the `teacher`
  state dict is read (as the official k-NN / linear evaluations do, `--checkpoint_key teacher`), or
  `student` with `key='student'`;
* a bare state dict (the released backbone files), or one under `state_dict` / `model`;

with any of the prefixes `module.` (DDP), `_orig_mod.` (torch.compile) and `backbone.` (the multi-crop
wrapper) on the names, as the official `load_pretrained_weights` strips them. Head tensors (`head.*`: the
projection MLP, and DINO's weight-normalised `last_layer`) are optional and not imported.

Backbone names and shapes (d width, C channels, P patch, N patches, h MLP width):

    cls_token (1, 1, d)    pos_embed (1, N + 1, d)    patch_embed.proj.weight (d, C, P, P) / .bias (d,)
    blocks.{i}.norm1.{weight,bias}    blocks.{i}.attn.qkv.weight (3d, d) / .bias (3d,)   [q; k; v] rows
    blocks.{i}.attn.proj.{weight (d, d), bias}    blocks.{i}.norm2.{weight,bias}
    blocks.{i}.mlp.fc1.{weight (h, d), bias}      blocks.{i}.mlp.fc2.{weight (d, h), bias}    norm.{weight,bias}

The qkv rows of head k are `k·p … (k+1)·p − 1` within each of q, k, v (the official reshape `[3, K, p]`).
The number of heads is not stored: it comes from the ViT size table or `num_heads=`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from crate_jax.models.config import VIT_VARIANTS, ModelConfig, model_config
from crate_jax.weights.layouts import variant_name
from crate_jax.weights.readers import WeightsError, file_kind, import_torch, read_tensors, torch_to_numpy

FORMATS = ("simdino-torch", "dino-torch")
KEYS = ("teacher", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_WRAPPERS = ("state_dict", "model")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name.replace("._orig_mod.", ".")


def _load_torch(path: Path):
    torch = import_torch(f"reading {path}")
    try:  # training checkpoints pickle their argparse Namespace beside the tensors: allow that class only
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True), torch
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the content
        raise WeightsError(f"{path}: torch.load(weights_only=True) failed ({e}); if the file pickles other "
                           f"objects, save its state dict alone: torch.save(torch.load(f, weights_only=False)"
                           f"['teacher'], 'teacher.pth')") from e


def read_state_dict(path: str | os.PathLike, key: str = "teacher") -> dict[str, np.ndarray]:
    """The backbone/head tensors of `path` under `key` (if the file has student and teacher), names stripped
    of the wrapper prefixes."""
    if key not in KEYS:
        raise WeightsError(f"checkpoint key {key!r}: expected one of {KEYS}")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if file_kind(path) == "torch":
        obj, torch = _load_torch(path)
        if isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in KEYS):
            if not isinstance(obj.get(key), Mapping):
                raise WeightsError(f"{path}: no '{key}' state dict (the file has {sorted(obj)})")
            obj = obj[key]
        for w in _WRAPPERS:
            if isinstance(obj, Mapping) and isinstance(obj.get(w), Mapping):
                obj = obj[w]
                break
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
        flat = {str(k): torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        flat = read_tensors(path)
        if any(k.startswith(f"{c}.") for k in flat for c in KEYS):
            flat = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(f"{key}.")}
    out = {}
    for k, v in flat.items():
        name = _strip(k)
        if name in out:
            raise WeightsError(f"{path}: two tensors map to {name!r} once the prefixes {_PREFIXES} are removed")
        out[name] = np.asarray(v)
    if not out:
        raise WeightsError(f"{path}: no tensors under '{key}'")
    return out


def infer_config(t: Mapping[str, np.ndarray], source: str, num_heads: int | None = None) -> ModelConfig:
    """The headless DINO-flavour ViT config the backbone tensors fit."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.mlp.fc1.weight")
    missing = [n for n in need if n not in t]
    if missing:
        raise WeightsError(f"{source}: not a DINO / SimDINO ViT state dict: missing {missing} (found e.g. "
                           f"{sorted(t)[:5]})")
    d, C, P, _ = t["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k)))
    n = t["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise WeightsError(f"{source}: pos_embed has {n} patch rows, not a square grid")
    if num_heads is None:
        num_heads = next((k for w, dp, k, _ in VIT_VARIANTS.values() if (w, dp) == (d, depth)), None)
        if num_heads is None:
            raise WeightsError(f"{source}: width {d} and depth {depth} match no ViT size "
                               f"({sorted(VIT_VARIANTS)}) and the file does not record the heads; pass --heads K")
    cfg = model_config("vit", f"Ti/{P}", width=d, depth=depth, num_heads=num_heads, patch_size=P, channels=C,
                       mlp_dim=t["blocks.0.mlp.fc1.weight"].shape[0], image_size=grid * P, num_classes=0,
                       ln_eps=1e-6, final_ln_eps=1e-6, init="dino", gelu="erf", pos_resize="dino")
    return cfg.replace(variant=variant_name(cfg))


def to_params(t: Mapping[str, np.ndarray], cfg: ModelConfig, source: str) -> dict:
    """Our parameter tree (blocks stacked over depth) from the stripped official tensors; every backbone
    tensor must be present with its shape, and nothing but `head.*` may be left over."""
    d, K, p, h, P, C = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size, cfg.channels
    used, problems = set(), []

    def get(name, shape):
        a = t.get(name)
        if a is None:
            problems.append(f"missing {name}")
            return np.zeros(shape, np.float32)
        used.add(name)
        if tuple(a.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            return np.zeros(shape, np.float32)
        return np.asarray(a, np.float32)

    def ln(prefix):
        return {"scale": get(f"{prefix}.weight", (d,)), "bias": get(f"{prefix}.bias", (d,))}

    def block(i):
        b = f"blocks.{i}."
        qkv_w, qkv_b = get(b + "attn.qkv.weight", (3 * d, d)), get(b + "attn.qkv.bias", (3 * d,))
        proj = {name: {"kernel": qkv_w[j * d:(j + 1) * d].T.reshape(d, K, p),
                       "bias": qkv_b[j * d:(j + 1) * d].reshape(K, p)}
                for j, name in enumerate(("query", "key", "value"))}
        proj["out"] = {"kernel": get(b + "attn.proj.weight", (d, d)).T.reshape(K, p, d),
                       "bias": get(b + "attn.proj.bias", (d,))}
        return {"ln1": ln(b + "norm1"), "attn": proj, "ln2": ln(b + "norm2"),
                "mlp": {"fc1": {"kernel": get(b + "mlp.fc1.weight", (h, d)).T, "bias": get(b + "mlp.fc1.bias", (h,))},
                        "fc2": {"kernel": get(b + "mlp.fc2.weight", (d, h)).T, "bias": get(b + "mlp.fc2.bias", (d,))}}}

    layers = [block(i) for i in range(cfg.depth)]
    blocks = jax.tree.map(lambda *a: np.stack(a), *layers)
    params = {"cls": get("cls_token", (1, 1, d)), "pos_embedding": get("pos_embed", (1, cfg.num_patches + 1, d)),
              "embedding": {"kernel": get("patch_embed.proj.weight", (d, C, P, P)).transpose(2, 3, 1, 0),
                            "bias": get("patch_embed.proj.bias", (d,))},
              "encoder": {"blocks": blocks}, "encoder_norm": ln("norm")}
    extra = sorted(k for k in t if k not in used and not k.startswith("head."))
    if extra:
        problems.append(f"unexpected {extra}")
    if problems:
        raise WeightsError(f"{source}: does not fit a DINO ViT {cfg.variant} (width {d}, depth {cfg.depth}, "
                           f"{K} heads): " + "; ".join(problems))
    dtype = np.dtype(cfg.param_dtype)
    return jax.tree.map(lambda a: np.asarray(a, dtype), params)


def import_dino(path: str | os.PathLike, *, key: str = "teacher", num_heads: int | None = None
                ) -> tuple[ModelConfig, dict]:
    """`(cfg, params)` of the backbone in a DINO / SimDINO checkpoint (`dino-torch` / `simdino-torch`: one
    layout; the name records which code wrote the file)."""
    tensors = read_state_dict(path, key)
    cfg = infer_config(tensors, str(path), num_heads)
    params = to_params(tensors, cfg, str(path))
    from crate_jax.weights.importer import _check_tree
    _check_tree(cfg, params)
    return cfg, params
