"""Language-model weight layouts <-> our `LanguageModel` tree (`crate_jax.models.lm`).

    python -m crate_jax.convert --format crate-gpt-torch --input ckpt.pt --output bundles/crate_gpt [--heads 12]
    python -m crate_jax.convert --format gpt2-hf --input pytorch_model.bin --output bundles/gpt2

| fmt | model | names |
|---|---|---|
| `crate-gpt-torch` | CRATE-GPT | the nanoGPT-style state_dict of CRATE pull request #13 (docs/math.md §Language models) |
| `gpt2-hf` | GPT-2 | a Hugging Face `GPT2LMHeadModel` (or `GPT2Model`) state_dict |

CRATE-GPT: `transformer.wte.weight [V, d]`, `transformer.wpe.weight [block, d]`, per block
`transformer.h.{i}.` `prenorm_1.{weight,bias}`, `attn.c_attn.weight [d, d]` (torch Linear: the shared
`U`, head index outer), `attn.c_proj.{weight [d, d], bias [d]}`, `prenorm_2.{weight,bias}`,
`ista.weight [d, d]` (used as is, docs/math.md §CRATE); the causal-mask buffer `attn.bias [1, 1, block, block]`
is ignored; `lm_head.weight` is the tied head and must equal `wte`.

GPT-2 (HF): Conv1D weights are stored `[in, out]` (`y = x W + b`), not torch Linear's `[out, in]`:
`transformer.h.{i}.ln_1`, `attn.c_attn.{weight [d, 3d], bias [3d]}` (q | k | v along the output),
`attn.c_proj [d, d]`, `ln_2`, `mlp.c_fc [d, h]`, `mlp.c_proj [h, d]`, `transformer.ln_f`; `lm_head.weight`
tied; the `attn.bias` / `attn.masked_bias` buffers are ignored. `GPT2Model` files without the
`transformer.` prefix and nanoGPT checkpoints (`{'model': ...}`, keys prefixed `_orig_mod.` by
`torch.compile`) are read too.

The sizes (vocab rows, block, width, depth, MLP width) come from the shapes; the head count is not
recorded in these files and comes from the size tables (`crate_jax.models.lm.LM_VARIANTS`) or
`--heads`. Every tensor is checked first (one error lists everything wrong); the maps are
transposes, reshapes and slices only, so `import -> export -> import` is exact bit for bit.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from crate_jax.errors import ConfigError
from crate_jax.models.lm import LM_VARIANTS, LMConfig, lm_config
from crate_jax.weights.layouts import flatten_tree
from crate_jax.weights.layout_check import raise_on_mismatch
from crate_jax.weights.readers import WeightsError, read_tensors

LM_FORMATS = {"crate-gpt-torch": "crate_gpt", "gpt2-hf": "gpt2"}
EXPORT_FORMAT = {v: k for k, v in LM_FORMATS.items()}  # model -> its official layout
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")
_BUFFERS = {"crate-gpt-torch": ("attn.bias",), "gpt2-hf": ("attn.bias", "attn.masked_bias")}
_PROBE = {"crate-gpt-torch": "ista.weight", "gpt2-hf": "mlp.c_fc.weight"}


def check_format(fmt: str) -> str:
    if fmt not in LM_FORMATS:
        raise WeightsError(f"unknown language-model weight format {fmt!r}; expected one of {sorted(LM_FORMATS)}")
    return LM_FORMATS[fmt]


def normalise_names(fmt: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips DDP's `module.` and torch.compile's `_orig_mod.`; adds `transformer.` to a bare `GPT2Model`."""
    check_format(fmt)
    out = dict(tensors)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    if fmt == "gpt2-hf" and "wte.weight" in out and not any(k.startswith("transformer.") for k in out):
        out = {("transformer." + k if k != "lm_head.weight" else k): v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------
# Rules: (official name, our '/'-path, official per-layer shape, to_ours, to_official)
# ------------------------------------------------------------------------------------------------
def _rules(fmt: str, cfg: LMConfig) -> list[tuple]:
    d, K, p, V, T = cfg.width, cfg.num_heads, cfg.head_dim, cfg.table_size, cfg.block_size
    same = (lambda a: a, lambda a: a)
    h, b = "transformer.h.{i}.", "encoder/blocks/"
    out = [("transformer.wte.weight", "embed/embedding", (V, d)) + same,
           ("transformer.wpe.weight", "pos_embedding", (T, d)) + same]
    if fmt == "crate-gpt-torch":
        linear_in = (lambda w: w.T.reshape(d, K, p), lambda k: k.reshape(d, K * p).T)   # torch Linear [out, in]
        linear_out = (lambda w: w.T.reshape(K, p, d), lambda k: k.reshape(K * p, d).T)
        return out + [
            (h + "prenorm_1.weight", b + "ln1/scale", (d,)) + same,
            (h + "prenorm_1.bias", b + "ln1/bias", (d,)) + same,
            (h + "attn.c_attn.weight", b + "mssa/proj/kernel", (d, d)) + linear_in,
            (h + "attn.c_proj.weight", b + "mssa/out/kernel", (d, d)) + linear_out,
            (h + "attn.c_proj.bias", b + "mssa/out/bias", (d,)) + same,
            (h + "prenorm_2.weight", b + "ln2/scale", (d,)) + same,
            (h + "prenorm_2.bias", b + "ln2/bias", (d,)) + same,
            (h + "ista.weight", b + "ista/D", (d, d)) + same,
        ]
    m = cfg.block.mlp_dim
    rules = [(h + "ln_1.weight", b + "ln1/scale", (d,)) + same, (h + "ln_1.bias", b + "ln1/bias", (d,)) + same]
    for j, name in enumerate(("query", "key", "value")):  # one c_attn tensor holds q | k | v (Conv1D [in, out])
        rules.append((h + "attn.c_attn.weight", f"{b}attn/{name}/kernel", (d, 3 * d),
                      lambda w, j=j: w[:, j * d:(j + 1) * d].reshape(d, K, p), None))
        rules.append((h + "attn.c_attn.bias", f"{b}attn/{name}/bias", (3 * d,),
                      lambda w, j=j: w[j * d:(j + 1) * d].reshape(K, p), None))
    return out + rules + [
        (h + "attn.c_proj.weight", b + "attn/out/kernel", (d, d), lambda w: w.reshape(K, p, d),
         lambda k: k.reshape(K * p, d)),
        (h + "attn.c_proj.bias", b + "attn/out/bias", (d,)) + same,
        (h + "ln_2.weight", b + "ln2/scale", (d,)) + same,
        (h + "ln_2.bias", b + "ln2/bias", (d,)) + same,
        (h + "mlp.c_fc.weight", b + "mlp/fc1/kernel", (d, m)) + same,
        (h + "mlp.c_fc.bias", b + "mlp/fc1/bias", (m,)) + same,
        (h + "mlp.c_proj.weight", b + "mlp/fc2/kernel", (m, d)) + same,
        (h + "mlp.c_proj.bias", b + "mlp/fc2/bias", (d,)) + same,
        ("transformer.ln_f.weight", "final_norm/scale", (d,)) + same,
        ("transformer.ln_f.bias", "final_norm/bias", (d,)) + same,
    ]


def _names(official: str, depth: int) -> list[str]:
    return [official.format(i=i) for i in range(depth)] if "{i}" in official else [official]


def expected_shapes(fmt: str, cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for official, _, shape, *_ in _rules(fmt, cfg):
        for name in _names(official, cfg.depth):
            out[name] = tuple(shape)
    return out


def layout_problems(fmt: str, cfg: LMConfig) -> list[str]:
    """Why `cfg` has no exact counterpart in `fmt` (empty: it has one)."""
    model = check_format(fmt)
    if not isinstance(cfg, LMConfig) or cfg.model != model:
        return [f"it is not a {model} language model (the {fmt} layout holds {model} models)"]
    official = dict(eta=0.1, lmbda=0.1, final_norm=model == "gpt2", ln_eps=1e-5)
    if model == "gpt2":
        official["final_ln_eps"] = 1e-5
    return [f"{k}={getattr(cfg, k)!r} (the official model has {k}={v!r})" for k, v in official.items()
            if getattr(cfg, k) != v]


# ------------------------------------------------------------------------------------------------
# Shapes -> config, checks, mapping
# ------------------------------------------------------------------------------------------------
def infer_config(fmt: str, tensors: Mapping[str, np.ndarray], heads: int | None = None, source: str = "weights",
                 **overrides) -> LMConfig:
    """The config the shapes imply: vocab rows and width from `wte`, block from `wpe`, depth from the
    block indices, the MLP width (GPT-2) from `c_fc`; heads from the size table or `heads`."""
    model = check_format(fmt)
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if len(shapes.get(key, ())) != 2:
            other = next((f for f, probe in _PROBE.items() if f != fmt and any(k.endswith(probe) for k in shapes)),
                         None)
            hint = f"; the names look like the {other} layout: pass --format {other}" if other else ""
            raise WeightsError(f"{source}: no 2-D '{key}', so this is not a {fmt} language-model state_dict "
                               f"(first names: {', '.join(sorted(shapes)[:6])}){hint}")
    vocab, width = shapes["transformer.wte.weight"]
    block = shapes["transformer.wpe.weight"][0]
    ids = [int(m.group(1)) for m in map(_LAYER.match, shapes) if m]
    depth = max(ids) + 1 if ids else 0
    if depth == 0:
        raise WeightsError(f"{source}: no 'transformer.h.{{i}}.' blocks found")
    if heads is None:
        heads = next((k for (w, dp, k) in LM_VARIANTS[model].values() if (w, dp) == (width, depth)), None)
        if heads is None:
            sizes = ", ".join(f"{n}: width {w}, depth {dp}" for n, (w, dp, _) in LM_VARIANTS[model].items())
            raise WeightsError(f"{source}: width {width} and depth {depth} match no {model} size ({sizes}), and the "
                               f"{fmt} layout does not record the number of heads; pass --heads K")
    fields = dict(width=width, depth=depth, num_heads=int(heads), vocab_size=vocab, block_size=block)
    if model == "gpt2":
        fc = shapes.get("transformer.h.0.mlp.c_fc.weight")
        if fc is not None and len(fc) == 2 and fc[1] != 4 * width:
            fields["mlp_dim"] = fc[1]
    fields.update(overrides)
    name = next((n for n, (w, dp, k) in LM_VARIANTS[model].items()
                 if (w, dp, k) == (fields["width"], fields["depth"], fields["num_heads"])), None)
    try:
        return lm_config(model, name, **fields)  # 'custom' outside the size tables
    except ConfigError as e:
        raise WeightsError(f"{source}: the shapes imply a model that cannot be built: {e}") from None


def check_layout(fmt: str, tensors: Mapping[str, np.ndarray], cfg: LMConfig, source: str = "weights") -> None:
    """One `WeightsError` listing every missing, unexpected, mis-shaped and non-float tensor, and an untied head."""
    buffers = _BUFFERS[fmt]
    head = []
    wte = tensors.get("transformer.wte.weight")
    if "lm_head.weight" in tensors and wte is not None:
        lm = np.asarray(tensors["lm_head.weight"])
        if lm.shape != np.shape(wte) or not np.array_equal(lm, np.asarray(wte)):
            head.append(f"lm_head.weight {lm.shape} differs from transformer.wte.weight {np.shape(wte)}: the models "
                        f"tie the head to the token embedding, so an untied head cannot be imported")
    raise_on_mismatch(tensors, expected_shapes(fmt, cfg),
                      ignore=lambda k: k == "lm_head.weight" or bool(_LAYER.match(k) and k.split(".", 3)[3] in buffers),
                      notes=head, header=f"{source} does not match the {fmt} layout of {describe(cfg)}:",
                      hint="crate-gpt-torch vs gpt2-hf")


def describe(cfg: LMConfig) -> str:
    """'crate_gpt crate (width 768, depth 12, 12 heads, vocab 50257, block 1024)'."""
    return (f"{cfg.model} {cfg.variant} (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, vocab "
            f"{cfg.vocab_size}, block {cfg.block_size})")


def to_params(fmt: str, tensors: Mapping[str, np.ndarray], cfg: LMConfig) -> dict:
    """Our nested tree (numpy, `cfg.param_dtype`, per-layer tensors stacked `[depth, ...]`)."""
    import jax.numpy as jnp
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for official, ours, _, to_ours, _ in _rules(fmt, cfg):
        arrays = [to_ours(np.asarray(tensors[n])) for n in _names(official, cfg.depth)]
        value = np.stack(arrays) if "{i}" in official else arrays[0]
        node = params
        *parents, leaf = ours.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.ascontiguousarray(value.astype(dtype, copy=False))
    return params


def from_params(fmt: str, params: Mapping, cfg: LMConfig, *, buffers: bool = True) -> dict[str, np.ndarray]:
    """The official flat dict of `fmt` (dtypes kept, bits unchanged), with the tied `lm_head.weight` and, for
    `crate-gpt-torch` with `buffers`, the causal-mask buffers the PR's model loads strictly."""
    problems = layout_problems(fmt, cfg)
    if problems:
        raise WeightsError(f"cannot export {describe(cfg)} to {fmt}: " + "; ".join(problems))
    flat = {"/".join(path): np.asarray(v) for path, v in flatten_tree(params)}
    out: dict[str, np.ndarray] = {}
    used = set()
    parts: dict[str, list] = {}
    for official, ours, _, _, to_official in _rules(fmt, cfg):
        if ours not in flat:
            raise WeightsError(f"parameter tree has no '{ours}', which the {fmt} layout needs for '{official}'")
        used.add(ours)
        value = flat[ours]
        layers = list(value) if "{i}" in official else [value]
        for name, part in zip(_names(official, cfg.depth), layers):
            if to_official is None:  # a GPT-2 q/k/v slice of c_attn: concatenated below, in q | k | v order
                parts.setdefault(name, []).append(part.reshape(part.shape[0], -1) if part.ndim == 3
                                                  else part.reshape(-1))
            else:
                out[name] = np.ascontiguousarray(to_official(part))
    for name, pieces in parts.items():
        out[name] = np.ascontiguousarray(np.concatenate(pieces, axis=-1))
    extra = sorted(set(flat) - used)
    if extra:
        raise WeightsError(f"the {fmt} layout has no place for parameters {extra}")
    out["lm_head.weight"] = out["transformer.wte.weight"].copy()
    if fmt == "crate-gpt-torch" and buffers:
        mask = np.tril(np.ones((cfg.block_size, cfg.block_size), np.float32))[None, None]
        for i in range(cfg.depth):
            out[f"transformer.h.{i}.attn.bias"] = mask
    return out




def import_lm_tensors(fmt: str, tensors: Mapping[str, np.ndarray], *, heads: int | None = None,
                      source: str = "weights", **overrides) -> tuple[LMConfig, dict]:
    """`(cfg, params)` from a flat dict of official tensors (checked first, all problems in one error)."""
    check_format(fmt)
    tensors = normalise_names(fmt, tensors)
    cfg = infer_config(fmt, tensors, heads, source, **overrides)
    check_layout(fmt, tensors, cfg, source)
    return cfg, to_params(fmt, tensors, cfg)


def import_lm(fmt: str, path: str | os.PathLike, *, heads: int | None = None, **overrides) -> tuple[LMConfig, dict]:
    """Reads a `.pt`/`.pth`/`.bin`, `.safetensors` or `.npz` state_dict of layout `fmt`."""
    check_format(fmt)
    return import_lm_tensors(fmt, read_tensors(path), heads=heads, source=str(path), **overrides)
