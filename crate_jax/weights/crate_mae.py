"""Official CRATE-MAE weights (`model/crate_ae/crate_ae.py` state_dict, docs/math.md §CRATE-MAE) -> our `CrateMAE` tree.

Official names (encoder and decoder blocks in CRATE's PreNorm naming, docs/weights.md §Layouts):

    patch_embed.proj.weight (d, C, P, P) / .bias (d,)      cls_token, mask_token (1, 1, d)
    pos_embed, decoder_pos_embed (1, L+1, d)               fixed sincos tables, checked, not imported
    blocks.{i}.layers.0.0.norm.{weight,bias}               blocks.{i}.layers.0.0.fn.qkv.weight (K·p, d)
    blocks.{i}.layers.0.0.fn.to_out.0.{weight,bias}        blocks.{i}.layers.0.1.norm.{weight,bias}
    blocks.{i}.layers.0.1.fn.weight (d, d)                 norm.{weight,bias}
    decoder_embed.{weight,bias} (d, d)                     (exists, unused by the forward)
    decoder_blocks.{i}.layers.0.0.norm.{weight,bias}       decoder_blocks.{i}.layers.0.0.fn.weight (d, d)
    decoder_blocks.{i}.layers.0.1.norm.{weight,bias}       decoder_blocks.{i}.layers.0.1.fn.qkv.weight
    decoder_blocks.{i}.layers.0.1.fn.to_out.0.{weight,bias}
    decoder_norm.{weight,bias}                             decoder_pred.{weight (P²·C, d), bias}

Training checkpoints wrapped as `{'model': ...}` / `{'state_dict': ...}` (readers unwrap them) or with
DDP's `module.` prefix are accepted. Width, depth, patch, channels and image size are read from the
shapes; the number of heads is not recorded, so it comes from the preset table (`MAE_VARIANTS`) or
`num_heads=`. The fixed tables must equal ours (`mae_sincos_2d`, to 1e-6): our bundles rebuild them from
the config, so a file with other tables would silently change the model.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from crate_jax.errors import ConfigError
from crate_jax.models.mae import MAE_VARIANTS, MAEConfig, mae_sincos_2d
from crate_jax.weights.readers import WeightsError, read_tensors

FORMAT = "crate-mae-torch"
_ENC = "blocks.{i}.layers.0."
_DEC = "decoder_blocks.{i}.layers.0."
TABLES = ("pos_embed", "decoder_pos_embed")


def _rules(cfg: MAEConfig):
    """(official name, our dotted path, official shape, official -> ours) per tensor; `{i}` = layer."""
    d, P, C = cfg.width, cfg.patch_size, cfg.channels
    K, Kd = cfg.num_heads, cfg.decoder_num_heads or cfg.num_heads
    T = lambda w: w.T
    same = lambda w: w

    def qkv(k):
        return lambda w: w.T.reshape(d, k, d // k)

    def out(k):
        return lambda w: w.T.reshape(k, d // k, d)

    enc = [("0.norm.weight", "ln1.scale", (d,), same), ("0.norm.bias", "ln1.bias", (d,), same),
           ("0.fn.qkv.weight", "mssa.proj.kernel", (d, d), qkv(K)),
           ("0.fn.to_out.0.weight", "mssa.out.kernel", (d, d), out(K)),
           ("0.fn.to_out.0.bias", "mssa.out.bias", (d,), same),
           ("1.norm.weight", "ln2.scale", (d,), same), ("1.norm.bias", "ln2.bias", (d,), same),
           ("1.fn.weight", "ista.D", (d, d), same)]
    dec = [("0.norm.weight", "ln1.scale", (d,), same), ("0.norm.bias", "ln1.bias", (d,), same),
           ("0.fn.weight", "synth.D", (d, d), same),
           ("1.norm.weight", "ln2.scale", (d,), same), ("1.norm.bias", "ln2.bias", (d,), same),
           ("1.fn.qkv.weight", "mssa.proj.kernel", (d, d), qkv(Kd)),
           ("1.fn.to_out.0.weight", "mssa.out.kernel", (d, d), out(Kd)),
           ("1.fn.to_out.0.bias", "mssa.out.bias", (d,), same)]
    top = [("patch_embed.proj.weight", "patch_embed.kernel", (d, C, P, P), lambda w: w.transpose(2, 3, 1, 0)),
           ("patch_embed.proj.bias", "patch_embed.bias", (d,), same),
           ("cls_token", "cls", (1, 1, d), same), ("mask_token", "mask_token", (1, 1, d), same),
           ("norm.weight", "norm.scale", (d,), same), ("norm.bias", "norm.bias", (d,), same),
           ("decoder_embed.weight", "decoder_embed.kernel", (d, d), T),
           ("decoder_embed.bias", "decoder_embed.bias", (d,), same),
           ("decoder_norm.weight", "decoder_norm.scale", (d,), same),
           ("decoder_norm.bias", "decoder_norm.bias", (d,), same),
           ("decoder_pred.weight", "decoder_pred.kernel", (P * P * C, d), T),
           ("decoder_pred.bias", "decoder_pred.bias", (P * P * C,), same)]
    return (top + [(_ENC + a, "encoder.blocks." + b, s, f) for a, b, s, f in enc]
            + [(_DEC + a, "decoder.blocks." + b, s, f) for a, b, s, f in dec])


def _depth(names, prefix: str) -> int:
    rx = re.compile("^" + re.escape(prefix) + r"\.(\d+)\.")
    ids = [int(m.group(1)) for m in map(rx.match, names) if m]
    return max(ids) + 1 if ids else 0


def normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = dict(tensors)
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def infer_config(tensors: Mapping[str, np.ndarray], source: str = "weights", **overrides) -> MAEConfig:
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    w = shapes.get("patch_embed.proj.weight")
    if w is None or len(w) != 4:
        hint = " (it looks like a CRATE classifier: use --format crate-torch)" if "to_patch_embedding.2.weight" in \
            shapes else ""
        raise WeightsError(f"{source}: no 4-D 'patch_embed.proj.weight'; this is not a CRATE-MAE state_dict "
                           f"(first names: {', '.join(sorted(shapes)[:6])}){hint}")
    width, channels, patch = w[0], w[1], w[2]
    depth, dec_depth = _depth(shapes, "blocks"), _depth(shapes, "decoder_blocks")
    fields: dict = dict(width=width, channels=channels, patch_size=patch, depth=depth, decoder_depth=dec_depth)
    pos = shapes.get("decoder_pos_embed") or shapes.get("pos_embed")
    if pos is not None and len(pos) == 3:
        g = int(round(np.sqrt(pos[1] - 1)))
        if g * g != pos[1] - 1:
            raise WeightsError(f"{source}: decoder_pos_embed has shape {pos}: {pos[1] - 1} patch rows is not a square "
                               f"grid")
        fields["image_size"] = g * patch
    name = next((n for n, (wd, dp, _) in MAE_VARIANTS.items() if (wd, dp) == (width, depth)), None)
    heads = overrides.pop("num_heads", None) or (MAE_VARIANTS[name][2] if name else None)
    if heads is None:
        raise WeightsError(f"{source}: width {width} and depth {depth} match no CRATE-MAE preset "
                           f"({', '.join(f'{n}: {wd}/{dp}' for n, (wd, dp, _) in MAE_VARIANTS.items())}) and the "
                           f"state_dict does not record the number of heads; pass --heads K")
    fields["num_heads"] = heads
    fields["variant"] = f"{name if name and MAE_VARIANTS[name][2] == heads else 'custom'}/{patch}"
    if dec_depth == depth:
        fields["decoder_depth"] = 0
    fields.update(overrides)
    try:
        return MAEConfig.build(**fields)
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{source}: the shapes give a CRATE-MAE config that does not build: {e}") from e


def _expected(cfg: MAEConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    depths = {"blocks": cfg.depth, "decoder_blocks": cfg.decoder_depth or cfg.depth}
    for official, _, shape, _ in _rules(cfg):
        if "{i}" in official:
            for i in range(depths[official.split(".")[0]]):
                out[official.format(i=i)] = shape
        else:
            out[official] = shape
    for t in TABLES:
        out[t] = (1, cfg.num_patches + 1, cfg.width)
    return out


def check_layout(tensors: Mapping[str, np.ndarray], cfg: MAEConfig, source: str = "weights") -> None:
    """One `WeightsError` listing every missing, unexpected and mis-shaped tensor, and tables that differ
    from the official fixed sincos tables."""
    expected = _expected(cfg)
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    misshaped = sorted(f"{k}  expected {expected[k]}, got {tuple(np.shape(tensors[k]))}" for k in expected
                       if k in tensors and tuple(np.shape(tensors[k])) != expected[k])
    lines = []
    if missing:
        lines += [f"  missing ({len(missing)}):"] + [f"    {k}  expected {expected[k]}" for k in missing]
    if unexpected:
        lines += [f"  unexpected ({len(unexpected)}):"] + [f"    {k}  got {tuple(np.shape(tensors[k]))}"
                                                            for k in unexpected]
    if misshaped:
        lines += [f"  mis-shaped ({len(misshaped)}):"] + [f"    {m}" for m in misshaped]
    if not lines:
        ours = mae_sincos_2d(cfg.grid, cfg.width)[None]
        for t in TABLES:
            err = float(np.max(np.abs(np.asarray(tensors[t], np.float64) - ours)))
            if not err <= 1e-6:
                lines.append(f"  {t}: differs from the official fixed 2-D sincos table by {err:.3g} (max abs); "
                             f"crate_jax rebuilds these tables from the config, so it cannot hold this model")
    if lines:
        raise WeightsError(f"{source} does not match the {FORMAT} layout of CRATE-MAE {cfg.variant} (width "
                           f"{cfg.width}, depth {cfg.depth}/{cfg.decoder_depth or cfg.depth}, {cfg.num_heads} heads, "
                           f"patch {cfg.patch_size}, {cfg.image_size} px):\n" + "\n".join(lines))


def to_params(tensors: Mapping[str, np.ndarray], cfg: MAEConfig) -> dict:
    """Our nested tree (per-layer tensors stacked `[depth, ...]`), values in `cfg.param_dtype`."""
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.param_dtype)
    depths = {"blocks": cfg.depth, "decoder_blocks": cfg.decoder_depth or cfg.depth}
    params: dict = {}
    for official, ours, _, fn in _rules(cfg):
        if "{i}" in official:
            value = np.stack([fn(np.asarray(tensors[official.format(i=i)]))
                              for i in range(depths[official.split(".")[0]])])
        else:
            value = fn(np.asarray(tensors[official]))
        node = params
        *parents, leaf = ours.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.ascontiguousarray(value.astype(dtype))
    return params


def import_tensors(tensors: Mapping[str, np.ndarray], *, source: str = "weights", **overrides):
    """`(cfg, params)` from a flat dict of official tensors."""
    tensors = normalise_names(tensors)
    cfg = infer_config(tensors, source, **overrides)
    check_layout(tensors, cfg, source)
    params = to_params(tensors, cfg)
    _check_tree(cfg, params)
    return cfg, params


def import_crate_mae(path: str | os.PathLike, **overrides):
    """Reads an official CRATE-MAE weight file (`.pth`/`.pt`, `.safetensors`, `.npz`)."""
    return import_tensors(read_tensors(path), source=str(path), **overrides)


def _check_tree(cfg: MAEConfig, params: dict) -> None:
    import jax
    from flax import nnx

    from crate_jax.models import registry

    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(registry.abstract(cfg), nnx.Param)))}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise AssertionError(f"the CRATE-MAE layout table disagrees with the model at {diff}")
