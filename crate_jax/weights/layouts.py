"""Official weight layouts <-> our parameter tree.

Three official layouts are supported (the `fmt` names used by `convert` and `export`):

| fmt | model | names | docs |
|---|---|---|---|
| `crate-torch` | CRATE | torch `model/crate.py` state_dict | docs/weights.md §Layouts |
| `crate-alpha-torch` | CRATE-α | torch_inference state_dict | docs/weights.md §Layouts |
| `crate-alpha-jax` | CRATE-α | big_vision flat '/' paths | docs/weights.md §Layouts |

Each layout is a list of `Rule`s, one per official tensor (per-layer tensors carry `{i}` in their
name), saying where it lives in our tree (`crate_jax.checkpoint.bundle.params_dict`; per-layer
parameters are stacked `[depth, ...]`) and how to map it both ways. The maps are transposes and
reshapes only, so a round trip is exact bit for bit.

Everything here works on shapes first: `infer_config` reads sizes from the tensors' shapes and
`check_layout` compares every name and shape against what the config implies, so real-size
variants can be checked without holding real weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping

import numpy as np

from crate_jax.models.config import VARIANTS, ModelConfig, model_config
from crate_jax.weights.readers import WeightsError

FORMATS = {"crate-torch": "crate", "crate-alpha-torch": "crate_alpha", "crate-alpha-jax": "crate_alpha"}

_LAYER_RE = {
    "crate-torch": re.compile(r"^transformer\.layers\.(\d+)\."),
    "crate-alpha-torch": re.compile(r"^transformer\.layers\.(\d+)\."),
    "crate-alpha-jax": re.compile(r"^Transformer/encoderblock_(\d+)/"),
}
# A name that only this layout has: used to tell the user which --format a file looks like.
_SIGNATURE = {
    "crate-torch": "to_patch_embedding.2.weight",
    "crate-alpha-torch": "conv1.weight",
    "crate-alpha-jax": "embedding/kernel",
}
_JAX_BLOCK = "Transformer/encoderblock_{i}/"
_JAX_ATTN = _JAX_BLOCK + "MultiHeadDotProductSubspaceAttention_0/"
_JAX_ODL = _JAX_BLOCK + "OvercompleteISTABlock_0/"
_TORCH_BLOCK = "transformer.layers.{i}."

# Defaults of the official code that no weight file records (docs/math.md §CRATE, §CRATE-α; docs/weights.md §Layouts).
_OFFICIAL = {
    "crate": dict(eta=0.1, lmbda=0.1, ln_eps=1e-5, causal=False),
    "crate_alpha": dict(eta=0.1, lmbda=0.1, ln_eps=1e-6, causal=False, odl_ratio=4, odl_steps=2,
                        odl_decoupled=True, odl_residual=True, attn_out_bias=False),
}
# eps of the final LayerNorm in each official implementation (docs/weights.md §Layouts: torch 1e-5, JAX 1e-6).
FINAL_LN_EPS = {"crate-torch": 1e-5, "crate-alpha-torch": 1e-5, "crate-alpha-jax": 1e-6}


def _same(a):
    return a


def _t(a):
    return a.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """One official tensor: `official` name (`{i}` = layer index), `ours` dotted path in our tree,
    its official `shape` (per layer), and the maps `to_ours` / `to_official` (per layer)."""

    official: str
    ours: str
    shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] = _same
    to_official: Callable[[np.ndarray], np.ndarray] = _same

    @property
    def layered(self) -> bool:
        return "{i}" in self.official


def check_format(fmt: str) -> str:
    """The model family of `fmt`, or a `WeightsError` naming the valid formats."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown weight format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


# ------------------------------------------------------------------------------------------------
# The layouts
# ------------------------------------------------------------------------------------------------
def rules(fmt: str, cfg: ModelConfig) -> list[Rule]:
    """The official tensors of `fmt` for a model with config `cfg`, in file order."""
    check_format(fmt)
    problems = layout_problems(fmt, cfg)
    if problems:
        raise WeightsError(f"the {fmt} layout cannot express this model config: " + "; ".join(problems))
    d, K, p, C, P = cfg.width, cfg.num_heads, cfg.head_dim, cfg.channels, cfg.patch_size
    n, classes = cfg.num_patches + 1, cfg.num_classes
    # MSSA maps (docs/weights.md §Layouts): torch `qkv.weight = proj.reshape(d, K·p).T`, `to_out.0.weight =
    # out.reshape(K·p, d).T`, head index outer in both.
    qkv = dict(to_ours=lambda w: w.T.reshape(d, K, p), to_official=lambda k: k.reshape(d, K * p).T)
    to_out = dict(to_ours=lambda w: w.T.reshape(K, p, d), to_official=lambda k: k.reshape(K * p, d).T)
    T = dict(to_ours=_t, to_official=_t)

    if fmt == "crate-torch":  # docs/weights.md §Layouts
        F = P * P * C
        tb = _TORCH_BLOCK
        return [
            Rule("pos_embedding", "pos_embedding", (1, n, d)),
            Rule("cls_token", "cls", (1, 1, d)),
            Rule("to_patch_embedding.1.weight", "patch_norm.scale", (F,)),
            Rule("to_patch_embedding.1.bias", "patch_norm.bias", (F,)),
            Rule("to_patch_embedding.2.weight", "embedding.kernel", (d, F), **T),
            Rule("to_patch_embedding.2.bias", "embedding.bias", (d,)),
            Rule("to_patch_embedding.3.weight", "embed_norm.scale", (d,)),
            Rule("to_patch_embedding.3.bias", "embed_norm.bias", (d,)),
            Rule(tb + "0.norm.weight", "encoder.blocks.ln1.scale", (d,)),
            Rule(tb + "0.norm.bias", "encoder.blocks.ln1.bias", (d,)),
            Rule(tb + "0.fn.qkv.weight", "encoder.blocks.mssa.proj.kernel", (K * p, d), **qkv),
            Rule(tb + "0.fn.to_out.0.weight", "encoder.blocks.mssa.out.kernel", (d, K * p), **to_out),
            Rule(tb + "0.fn.to_out.0.bias", "encoder.blocks.mssa.out.bias", (d,)),
            Rule(tb + "1.norm.weight", "encoder.blocks.ln2.scale", (d,)),
            Rule(tb + "1.norm.bias", "encoder.blocks.ln2.bias", (d,)),
            Rule(tb + "1.fn.weight", "encoder.blocks.ista.D", (d, d)),  # used as is (docs/math.md §CRATE)
            Rule("mlp_head.0.weight", "encoder_norm.scale", (d,)),
            Rule("mlp_head.0.bias", "encoder_norm.bias", (d,)),
            Rule("mlp_head.1.weight", "head.kernel", (classes, d), **T),
            Rule("mlp_head.1.bias", "head.bias", (classes,)),
        ]

    m = cfg.dict_size
    if fmt == "crate-alpha-torch":  # docs/weights.md §Layouts
        tb = _TORCH_BLOCK
        return [
            Rule("cls_token", "cls", (1, 1, d)),
            Rule("pos_embedding", "pos_embedding", (1, n, d)),
            Rule("conv1.weight", "embedding.kernel", (d, C, P, P),
                 to_ours=lambda w: w.transpose(2, 3, 1, 0), to_official=lambda k: k.transpose(3, 2, 0, 1)),
            Rule("conv1.bias", "embedding.bias", (d,)),
            Rule(tb + "0.norm.weight", "encoder.blocks.ln1.scale", (d,)),
            Rule(tb + "0.norm.bias", "encoder.blocks.ln1.bias", (d,)),
            Rule(tb + "0.fn.qkv.weight", "encoder.blocks.mssa.proj.kernel", (K * p, d), **qkv),
            Rule(tb + "0.fn.to_out.0.weight", "encoder.blocks.mssa.out.kernel", (d, K * p), **to_out),
            Rule(tb + "1.norm.weight", "encoder.blocks.ln2.scale", (d,)),
            Rule(tb + "1.norm.bias", "encoder.blocks.ln2.bias", (d,)),
            Rule(tb + "1.fn.D", "encoder.blocks.odl.D", (d, m)),
            Rule(tb + "1.fn.D1", "encoder.blocks.odl.D1", (d, m)),
            Rule("mlp_head.0.weight", "encoder_norm.scale", (d,)),
            Rule("mlp_head.0.bias", "encoder_norm.bias", (d,)),
            Rule("mlp_head.1.weight", "head.kernel", (classes, d), **T),
            Rule("mlp_head.1.bias", "head.bias", (classes,)),
        ]

    # crate-alpha-jax, docs/weights.md §Layouts: our tree follows big_vision's, so every map is the identity.
    out = [Rule("cls", "cls", (1, 1, d))]
    if cfg.posemb == "learn":
        out.append(Rule("pos_embedding", "pos_embedding", (1, n, d)))
    out.append(Rule("embedding/kernel", "embedding.kernel", (P, P, C, d)))
    if cfg.stem_bias:
        out.append(Rule("embedding/bias", "embedding.bias", (d,)))
    out += [
        Rule(_JAX_BLOCK + "LayerNorm_0/scale", "encoder.blocks.ln1.scale", (d,)),
        Rule(_JAX_BLOCK + "LayerNorm_0/bias", "encoder.blocks.ln1.bias", (d,)),
        Rule(_JAX_ATTN + "proj/kernel", "encoder.blocks.mssa.proj.kernel", (d, K, p)),
        Rule(_JAX_ATTN + "out/kernel", "encoder.blocks.mssa.out.kernel", (K, p, d)),
        Rule(_JAX_BLOCK + "LayerNorm_1/scale", "encoder.blocks.ln2.scale", (d,)),
        Rule(_JAX_BLOCK + "LayerNorm_1/bias", "encoder.blocks.ln2.bias", (d,)),
        Rule(_JAX_ODL + "D", "encoder.blocks.odl.D", (d, m)),
        Rule(_JAX_ODL + "D1", "encoder.blocks.odl.D1", (d, m)),
        Rule("encoder_norm/scale", "encoder_norm.scale", (d,)),
        Rule("encoder_norm/bias", "encoder_norm.bias", (d,)),
    ]
    if classes:
        out.append(Rule("head/kernel", "head.kernel", (d, classes)))
        if cfg.head_bias:
            out.append(Rule("head/bias", "head.bias", (classes,)))
    return out


def layout_problems(fmt: str, cfg: ModelConfig) -> list[str]:
    """Why `cfg` has no exact counterpart in the official `fmt` model (empty list: it has one).

    The official code hard-codes the sparse-coding constants and block structure, and the torch
    models always have every bias, a learned position embedding and a head.
    """
    model = check_format(fmt)
    if cfg.model != model:
        return [f"it is a {cfg.model} model, the {fmt} layout holds {model} models"]
    out = []
    for field, value in _OFFICIAL[model].items():
        if getattr(cfg, field) != value:
            out.append(f"{field}={getattr(cfg, field)!r} (the official model has {field}={value!r})")
    torch_layout = fmt.endswith("-torch")
    if torch_layout:
        if cfg.posemb != "learn":
            out.append(f"posemb={cfg.posemb!r} (the torch model has a learned position embedding only)")
        if not cfg.stem_bias:
            out.append("stem_bias=False (the torch model always has a patch-embedding bias)")
        if not cfg.num_classes:
            out.append("num_classes=0 (the torch model always has a classification head)")
        if not cfg.head_bias:
            out.append("head_bias=False (the torch model's head always has a bias)")
    if model == "crate" and not cfg.attn_out_bias:
        out.append("attn_out_bias=False (CRATE's attention output projection has a bias)")
    return out


def expected_shapes(fmt: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every official tensor name for `cfg` with its shape (per-layer names expanded)."""
    out = {}
    for rule in rules(fmt, cfg):
        for name in _names(rule, cfg.depth):
            out[name] = tuple(rule.shape)
    return out


def _names(rule: Rule, depth: int) -> list[str]:
    return [rule.official.format(i=i) for i in range(depth)] if rule.layered else [rule.official]


# ------------------------------------------------------------------------------------------------
# Names as stored -> names of the layout
# ------------------------------------------------------------------------------------------------
def normalise_names(fmt: str, tensors: Mapping[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
    """Strips the wrappers training code adds: DDP's `module.` (torch layouts, docs/weights.md §Layouts) and
    big_vision's `params/` with its `opt/…`, `chrono/…` siblings (JAX layout, docs/weights.md §Layouts)."""
    check_format(fmt)
    tensors = dict(tensors)
    if fmt.endswith("-torch"):
        if tensors and all(k.startswith("module.") for k in tensors):
            tensors = {k[len("module."):]: v for k, v in tensors.items()}
        return tensors
    if any(k.startswith("params/") for k in tensors):
        tensors = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    if any(k.startswith("img/") for k in tensors):
        raise WeightsError(f"{source}: this is a two-tower (CLIPA) checkpoint with img/… and txt/… parameters, "
                           f"not an image classifier; the crate-alpha-jax import reads classifier trees")
    return tensors


def guess_format(names) -> str | None:
    """The layout whose signature tensor is among `names` (after wrapper prefixes), if any."""
    names = {re.sub(r"^(module\.|params/)", "", n) for n in names}
    for fmt, key in _SIGNATURE.items():
        if key in names:
            return fmt
    return None


# ------------------------------------------------------------------------------------------------
# Config inference from shapes
# ------------------------------------------------------------------------------------------------
def infer_config(fmt: str, tensors: Mapping[str, np.ndarray], variant: str | None = None,
                 source: str = "weights", **overrides) -> ModelConfig:
    """The model config that the tensors' shapes imply (names already normalised).

    Width and depth pick the size name from the variant tables (docs/math.md §Sizes); the patch size
    comes from the stem kernel, the image size from the position embedding, heads from the MSSA
    kernel where the layout has them (`crate-alpha-jax`), else from the variant table. `variant`
    (e.g. 'B/16'; without '/P' the patch is still read from the kernel) replaces the inferred
    width/depth/heads/patch; `overrides` replace any `ModelConfig` field. Disagreements between
    the result and the tensors are reported by `check_layout`.
    """
    model = check_format(fmt)
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}

    def dim(what, *candidates):
        """The first available `shape[axis]` among `(name, axis)` candidates."""
        for name, axis in candidates:
            if name in shapes and len(shapes[name]) > axis:
                return shapes[name][axis]
        hint = ""
        guessed = guess_format(shapes)
        if guessed and guessed != fmt:
            hint = f"; the names look like the {guessed} layout: pass --format {guessed}"
        shown = ", ".join(sorted(shapes)[:6])
        raise WeightsError(f"{source}: cannot read the {what} of a {fmt} model: none of "
                           f"{[n for n, _ in candidates]} is present (first names in the file: {shown}){hint}")

    layer_ids = [int(m.group(1)) for m in map(_LAYER_RE[fmt].match, shapes) if m]
    depth = max(layer_ids) + 1 if layer_ids else 0
    got: dict = {}
    heads = None
    if fmt == "crate-torch":
        width = dim("width", ("to_patch_embedding.2.weight", 0), ("cls_token", 2), ("mlp_head.0.weight", 0))
        feats = dim("patch size", ("to_patch_embedding.1.weight", 0), ("to_patch_embedding.2.weight", 1))
        channels = overrides.get("channels", 3)
        patch = math.isqrt(feats // channels)
        if patch * patch * channels != feats:
            raise WeightsError(f"{source}: the patch embedding has {feats} input features, which is not "
                               f"P·P·{channels} for any patch size P (pass channels=... if the images do not "
                               f"have {channels} channels)")
        got.update(channels=channels,
                   num_classes=dim("number of classes", ("mlp_head.1.weight", 0), ("mlp_head.1.bias", 0)))
    elif fmt == "crate-alpha-torch":
        width = dim("width", ("conv1.weight", 0), ("cls_token", 2), ("mlp_head.0.weight", 0))
        patch = dim("patch size", ("conv1.weight", 3))
        got.update(channels=dim("channels", ("conv1.weight", 1)),
                   num_classes=dim("number of classes", ("mlp_head.1.weight", 0), ("mlp_head.1.bias", 0)))
    else:
        width = dim("width", ("embedding/kernel", 3), ("cls", 2))
        patch = dim("patch size", ("embedding/kernel", 0))
        got.update(channels=dim("channels", ("embedding/kernel", 2)),
                   stem_bias="embedding/bias" in shapes, head_bias="head/bias" in shapes,
                   num_classes=_maybe(shapes, "head/kernel", 1) or _maybe(shapes, "head/bias", 0) or 0)
        if "pos_embedding" not in shapes:  # big_vision posemb='sincos2d' stores no table
            got["posemb"] = "sincos2d"
        proj = [s for k, s in shapes.items() if k.endswith("/proj/kernel") and len(s) == 3]
        heads = proj[0][1] if proj else None
    got["final_ln_eps"] = FINAL_LN_EPS[fmt]

    if variant:
        name_part, slash, _ = variant.partition("/")
        base = model_config(model, variant if slash else f"{name_part}/{patch}")
        width, depth, heads, patch = base.width, base.depth, base.num_heads, base.patch_size
    else:
        heads = overrides.get("num_heads", heads or _table_name(model, width, depth)[1])
        if heads is None:
            raise WeightsError(
                f"{source}: width {width} and depth {depth} match no {model} variant "
                f"({_table_text(model)}) and the {fmt} layout does not record the number of heads; "
                f"pass --heads K (num_heads=K) or --variant NAME/P")

    pos = shapes.get("pos_embedding")
    if pos is not None and len(pos) == 3 and "image_size" not in overrides:
        grid = math.isqrt(max(pos[1] - 1, 0))
        if grid * grid != pos[1] - 1:
            raise WeightsError(f"{source}: pos_embedding has shape {pos}: {pos[1] - 1} patch rows is not a square "
                               f"grid, so the image size cannot be read from it; pass image_size=... (--image-size)")
        got["image_size"] = grid * patch
    fields = dict(width=width, depth=depth, num_heads=heads, patch_size=patch, **got)
    fields.update(overrides)
    # model_config supplies the family defaults (eps, biases); every structural field is set here.
    cfg = model_config(model, next(iter(VARIANTS[model])), **fields)
    return cfg.replace(variant=variant_name(cfg))


def variant_name(cfg: ModelConfig) -> str:
    """'B/16' when width, depth and heads are a table size, else 'custom/16'."""
    name, heads = _table_name(cfg.model, cfg.width, cfg.depth)
    return f"{name}/{cfg.patch_size}" if name and heads == cfg.num_heads else f"custom/{cfg.patch_size}"


def _maybe(shapes, name, axis):
    s = shapes.get(name)
    return s[axis] if s is not None and len(s) > axis else None


def _table_name(model: str, width: int, depth: int) -> tuple[str | None, int | None]:
    for name, (w, dp, k, _) in VARIANTS[model].items():
        if (w, dp) == (width, depth):
            return name, k
    return None, None


def _table_text(model: str) -> str:
    return ", ".join(f"{n}: width {w}, depth {dp}" for n, (w, dp, _, _) in VARIANTS[model].items())


# ------------------------------------------------------------------------------------------------
# Checking and mapping
# ------------------------------------------------------------------------------------------------
def check_layout(fmt: str, tensors: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "weights") -> None:
    """One `WeightsError` listing every missing, unexpected, mis-shaped and non-float tensor."""
    expected = expected_shapes(fmt, cfg)
    missing = [(k, s) for k, s in expected.items() if k not in tensors]
    unexpected = [(k, tuple(np.shape(v))) for k, v in tensors.items() if k not in expected]
    misshaped = [(k, s, tuple(np.shape(tensors[k]))) for k, s in expected.items()
                 if k in tensors and tuple(np.shape(tensors[k])) != s]
    not_float = [(k, np.asarray(tensors[k]).dtype) for k in expected
                 if k in tensors and not _is_float(tensors[k])]
    if not (missing or unexpected or misshaped or not_float):
        return
    lines = [f"{source} does not match the {fmt} layout of {describe(cfg)}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}):")
        lines += [f"    {k}  expected {s}" for k, s in sorted(missing, key=_natural)]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}):")
        lines += [f"    {k}  got {s}" for k, s in sorted(unexpected, key=_natural)]
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}):")
        lines += [f"    {k}  expected {s}, got {g}" for k, s, g in sorted(misshaped, key=_natural)]
    if not_float:
        lines.append(f"  not floating point ({len(not_float)}):")
        lines += [f"    {k}  dtype {dt}" for k, dt in sorted(not_float, key=_natural)]
    lines += _hints(fmt, [k for k, _ in unexpected], [k for k, _ in missing])
    raise WeightsError("\n".join(lines))


def _is_float(a) -> bool:
    dt = np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype
    return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"


def _hints(fmt, unexpected, missing) -> list[str]:
    out = []
    if any(re.search(r"/ls[12](/|$)", k) for k in unexpected):
        out.append("hint: ls1/ls2 are LayerScale parameters (init_values); crate_jax models have no LayerScale")
    if fmt == "crate-alpha-jax" and "pos_embedding" in missing:
        out.append("hint: a model trained with posemb='sincos2d' stores no pos_embedding: pass posemb='sincos2d'")
    guessed = guess_format(unexpected)
    if guessed and guessed != fmt:
        out.append(f"hint: the names look like the {guessed} layout: pass --format {guessed}")
    if missing and unexpected and not out:
        out.append("hint: missing and unexpected names together usually mean a wrong --variant, --heads or "
                   "image size, or a file of another model")
    return out


def _natural(item):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def describe(cfg: ModelConfig) -> str:
    """'crate_alpha B/16 (width 768, depth 12, 12 heads, 224 px, 1000 classes)'."""
    return (f"{cfg.model} {cfg.variant} (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"patch {cfg.patch_size}, {cfg.image_size} px, {cfg.num_classes} classes, posemb {cfg.posemb})")


def to_params(fmt: str, tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype=None) -> dict:
    """Our nested parameter tree from checked official tensors; values cast to `dtype`
    (default `cfg.param_dtype`). Per-layer tensors are stacked on a leading `[depth]` axis."""
    import jax.numpy as jnp  # for the bfloat16 numpy dtype by name

    dtype = jnp.dtype(dtype or cfg.param_dtype)
    params: dict = {}
    for rule in rules(fmt, cfg):
        arrays = [rule.to_ours(np.asarray(tensors[name])) for name in _names(rule, cfg.depth)]
        value = np.stack(arrays) if rule.layered else arrays[0]
        _set(params, rule.ours, np.ascontiguousarray(value.astype(dtype, copy=False)))
    return params


def from_params(fmt: str, params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The official flat dict of `fmt` from our nested tree (dtypes kept, bits unchanged).
    Every leaf of `params` must be used: leftovers mean the layout cannot hold the model."""
    flat = {".".join(path): np.asarray(v) for path, v in flatten_tree(params)}
    out, used = {}, set()
    for rule in rules(fmt, cfg):
        if rule.ours not in flat:
            raise WeightsError(f"parameter tree has no '{rule.ours}', which the {fmt} layout needs "
                               f"for '{rule.official}'")
        used.add(rule.ours)
        value = flat[rule.ours]
        names = _names(rule, cfg.depth)
        parts = list(value) if rule.layered else [value]
        if len(parts) != len(names):
            raise WeightsError(f"parameter '{rule.ours}' has {len(parts)} layers, config depth is {cfg.depth}")
        for name, part in zip(names, parts):
            out[name] = np.ascontiguousarray(rule.to_official(part))
    extra = sorted(set(flat) - used)
    if extra:
        raise WeightsError(f"the {fmt} layout has no place for parameters {extra}")
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def flatten_tree(tree: Mapping, prefix=()):
    """`(path tuple, leaf)` for every leaf of a nested mapping, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_tree(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value
