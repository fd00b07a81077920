"""Model configuration and the variant tables (docs/math.md §Sizes).

A `ModelConfig` is plain, frozen data: it is what `convert` writes next to a checkpoint as JSON and
what the image classifier takes. `model_config(model, variant, **overrides)` is the one way to
build it from a variant name such as `"B/16"`. Its `block` is the `BlockConfig` the shared encoder
blocks read; other networks (text towers, language models) derive their own `BlockConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

MODELS = ("crate", "crate_alpha", "vit")
POOLS = ("cls", "mean")
POSEMBS = ("learn", "sincos2d")
REMATS = ("none", "dots", "full")
ATTENTIONS = ("fused", "explicit")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# ViT flavours (docs/dino.md): 'default' is the big_vision-style ViT (xavier-uniform Dense
# kernels, He-uniform patch conv), 'dino' the official DINO / SimDINO ViT (trunc-normal(0.02) Linear
# weights with zero biases, torch's Conv2d default for the patch conv, trunc-normal(0.02) cls and position
# table). `gelu`: 'tanh' (big_vision, GPT-2) or 'erf' (torch nn.GELU). `pos_resize`: how a learned position
# table is resampled for views of another size: 'jax' (antialiased bicubic `jax.image.resize`) or 'dino'
# (DINO's `interpolate_pos_encoding`: torch bicubic, a = −0.75, no antialias, scale factor (g′ + 0.1)/g).
INITS = ("default", "dino")
GELUS = ("tanh", "erf")
POS_RESIZES = ("jax", "dino")

# name -> (width d, depth, heads K, mlp width). docs/math.md §Sizes (CRATE, CRATE-α), big_vision ViT.
CRATE_VARIANTS = {
    "T": (384, 12, 6, 0),
    "S": (576, 12, 12, 0),
    "B": (768, 12, 12, 0),
    "L": (1024, 24, 16, 0),
}
CRATE_ALPHA_VARIANTS = {
    "Ti": (192, 12, 3, 0),
    "S": (576, 12, 12, 0),
    "B": (768, 12, 12, 0),
    "L": (1024, 24, 16, 0),
    "H": (1280, 32, 16, 0),
    "g": (1408, 40, 16, 0),
    "G": (1664, 48, 16, 0),
    "e": (1792, 56, 16, 0),
}
VIT_VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
VARIANTS = {"crate": CRATE_VARIANTS, "crate_alpha": CRATE_ALPHA_VARIANTS, "vit": VIT_VARIANTS}

# Per-model defaults that follow the official code (docs/math.md §CRATE, §CRATE-α).
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "crate": dict(ln_eps=1e-5, final_ln_eps=1e-5, attn_out_bias=True, posemb="learn"),
    "crate_alpha": dict(ln_eps=1e-6, final_ln_eps=1e-6, attn_out_bias=False, posemb="learn"),
    "vit": dict(ln_eps=1e-6, final_ln_eps=1e-6, attn_out_bias=True, posemb="learn"),
}


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message says which field and what to change."""


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One stack of identical encoder blocks: what `blocks.py` and `encoder.py` read.

    Image classifiers, text towers and (later) language models all derive one from their own
    config (`ModelConfig.block`, `TextConfig.block`), so the blocks never see image fields.
    `family` picks the block: 'crate' (MSSA + ISTA), 'crate_alpha' (MSSA + ODL) or 'vit'.
    """

    family: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int = 0  # ViT MLP width (unused by CRATE / CRATE-α).
    # Sparse-coding step size η and threshold λ (docs/math.md §CRATE, §CRATE-α): fixed constants, not learned.
    eta: float = 0.1
    lmbda: float = 0.1
    # CRATE-α ODL block (docs/math.md §ODL); the official code hard-codes 4 / 2 / True / True.
    odl_ratio: int = 4
    odl_steps: int = 2
    odl_decoupled: bool = True
    odl_residual: bool = True
    ln_eps: float = 1e-6
    attn_out_bias: bool = False  # MSSA output projection bias: CRATE yes, CRATE-α no.
    init: str = "default"  # ViT: 'default' (big_vision) or 'dino' (official DINO / SimDINO ViT), see INITS
    gelu: str = "tanh"  # ViT MLP activation: 'tanh' approximation or the exact 'erf' GELU
    causal: bool = False
    attention: str = "fused"  # 'fused': jax.nn.dot_product_attention; 'explicit': einsum + softmax.
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan: bool = False
    remat: str = "none"
    dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def dict_size(self) -> int:
        """Width of the sparse code: CRATE's square dictionary, CRATE-α's overcomplete one."""
        if self.family == "crate":
            return self.width
        if self.family == "crate_alpha":
            return self.odl_ratio * self.width
        return self.mlp_dim

    def validate(self, what: str = "model") -> None:
        def bad(field, msg):
            raise ConfigError(f"{what} config field '{field}': {msg}")

        if self.family not in MODELS:
            bad("model", f"got {self.family!r}, expected one of {MODELS}")
        for field, allowed in (("remat", REMATS), ("attention", ATTENTIONS), ("dtype", DTYPES),
                               ("param_dtype", DTYPES), ("init", INITS), ("gelu", GELUS)):
            if getattr(self, field) not in allowed:
                bad(field, f"got {getattr(self, field)!r}, expected one of {allowed}")
        if self.width <= 0 or self.depth <= 0 or self.num_heads <= 0:
            bad("width", f"width, depth and num_heads must be positive, got {self.width}, {self.depth}, "
                f"{self.num_heads}")
        if self.width % self.num_heads:
            bad("num_heads", f"width {self.width} is not divisible by {self.num_heads} heads")
        if self.family == "vit" and self.mlp_dim <= 0:
            bad("mlp_dim", "ViT needs a positive MLP width")
        if self.odl_steps < 1 or self.odl_ratio < 1:
            bad("odl_steps", "odl_steps and odl_ratio must be >= 1")
        for field in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, field) < 1.0:
                bad(field, f"must be in [0, 1), got {getattr(self, field)}")

    def replace(self, **changes) -> "BlockConfig":
        return dataclasses.replace(self, **changes)


# Every option of a block stack, declared once (in `BlockConfig`). Each model config holds a `block:
# BlockConfig` and reads these through it (`cfg.block.remat`, or `cfg.remat` for short); its builders and
# `from_dict` take them flat (`model_config('vit', 'B/16', remat='full')`, the flat `model.json` of older
# bundles) or nested (`{"block": {...}}`, what `to_dict` writes). Adding a block option is one field in
# `BlockConfig` (docs/adding_a_model.md §A new block option).
BLOCK_OPTIONS = tuple(f.name for f in dataclasses.fields(BlockConfig) if f.name != "family")


def check_fields(cls, keys, what: str, extra=()) -> None:
    """Raises a ConfigError naming every key of `keys` that is not a field of the dataclass `cls` (or in `extra`),
    with the closest known key for each."""
    import difflib
    names = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(keys) - names)
    if unknown:
        hints = [f"{close[0]!r} for {k!r}" for k in unknown if (close := difflib.get_close_matches(k, names, 1, 0.75))]
        raise ConfigError(f"unknown {what} config keys {unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints
                                                                     else "") + f"; known keys are {sorted(names)}")


class Serialised:
    """A model config that holds a `block: BlockConfig`, with `build` / `from_dict` (flat or nested block
    options), `to_dict` / `to_json` and `replace`; `what` names it in errors.

    A subclass declares its own fields plus `block: BlockConfig`, and says how its block follows from its
    own fields: `block_family(own)` (the block family) and `complete_block(own, options)` (options the
    family fixes, e.g. a language model's causal mask). Block options read through the config too
    (`cfg.width` is `cfg.block.width`).
    """

    what: ClassVar[str] = "model"

    @classmethod
    def block_family(cls, own: dict[str, Any]) -> str:
        return own["model"]

    @classmethod
    def complete_block(cls, own: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        return options

    @classmethod
    def keys(cls) -> set[str]:
        """Every key `build` takes: the config's own fields and the block options."""
        return ({f.name for f in dataclasses.fields(cls)} - {"block"}) | set(BLOCK_OPTIONS)

    @classmethod
    def build(cls, **fields):
        """The config from its own fields and block options, flat or as `block=` (a BlockConfig or a dict)."""
        nested = fields.pop("block", None)
        options = dict(dataclasses.asdict(nested) if isinstance(nested, BlockConfig) else nested or {})
        options.pop("family", None)
        own_names = {f.name for f in dataclasses.fields(cls)} - {"block"}
        check_fields(cls, fields, cls.what, extra=BLOCK_OPTIONS)
        check_fields(BlockConfig, options, f"{cls.what} block")
        own = {k: v for k, v in fields.items() if k in own_names}
        options.update({k: v for k, v in fields.items() if k not in own_names})
        missing = [k for k in ("width", "depth", "num_heads") if k not in options]
        if missing:
            raise ConfigError(f"{cls.what} config: missing {missing} (the size of its blocks)")
        try:
            block = BlockConfig(family=cls.block_family(own), **cls.complete_block(own, options))
        except ConfigError as e:
            raise ConfigError(str(e).replace("model config field", f"{cls.what} config field", 1)) from None
        except KeyError as e:
            raise ConfigError(f"{cls.what} config: missing field {e}") from None
        return cls(block=block, **own)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls.build(**d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: v.to_dict() if isinstance(v, Serialised) else v for k, v in d.items()}
        if isinstance(d.get("block"), BlockConfig):
            d["block"] = {k: v for k, v in dataclasses.asdict(d["block"]).items() if k != "family"}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes):
        """A copy with `changes` (own fields or block options), its block re-derived as `build` does."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "block"}
        options = {k: v for k, v in dataclasses.asdict(self.block).items() if k != "family"}
        return type(self).build(**{**own, **options, **changes})

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: block options read through the held BlockConfig
        block = self.__dict__.get("block")
        if block is not None and name in BLOCK_OPTIONS:
            return getattr(block, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Serialised):
    """Everything that fixes an image classifier's parameters and forward pass (the JSON a bundle stores).

    `block` is the `BlockConfig` of its encoder (width, depth, heads and every block option). Shapes: images are NHWC `[B, image_size, image_size, channels]`; tokens are
    `[B, N+1, width]` with `N = (image_size / patch_size)**2` patches plus the cls token.
    """

    kind: ClassVar[str] = "classifier"  # the bundle kind (crate_jax.models.registry)

    model: str  # the block family: 'crate', 'crate_alpha' or 'vit'
    variant: str
    block: BlockConfig
    patch_size: int
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features.
    pool: str = "cls"
    posemb: str = "learn"
    final_ln_eps: float = 1e-6
    stem_bias: bool = True  # conv / patch-embedding bias (CRATE-α `emb_head_bias`)
    head_bias: bool = True
    pos_resize: str = "jax"  # 'dino': local-crop position tables as DINO resamples them (POS_RESIZES)
    emb_dropout: float = 0.0

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def dict_size(self) -> int:
        return self.block.dict_size

    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"model config field '{field}': {msg}")

        if self.model not in MODELS:
            bad("model", f"got {self.model!r}, expected one of {MODELS}")
        for field, allowed in (("pool", POOLS), ("posemb", POSEMBS), ("pos_resize", POS_RESIZES)):
            if getattr(self, field) not in allowed:
                bad(field, f"got {getattr(self, field)!r}, expected one of {allowed}")
        if self.block.family != self.model:
            bad("model", f"the block family {self.block.family!r} is not the model {self.model!r}")
        if self.patch_size <= 0 or self.image_size <= 0 or self.image_size % self.patch_size:
            bad("image_size", f"{self.image_size} px is not divisible by patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size} (e.g. {self.patch_size * max(1, self.image_size // max(1, self.patch_size))})")
        if self.num_classes < 0:
            bad("num_classes", f"must be >= 0 (0: no head), got {self.num_classes}")
        if self.model == "crate_alpha" and self.pool != "cls":
            bad("pool", "CRATE-α always pools the cls token (docs/math.md §CRATE-α); use pool='cls'")
        if self.model == "crate" and self.posemb != "learn":
            bad("posemb", "CRATE uses a learned position embedding (docs/math.md §CRATE)")
        if self.posemb == "sincos2d" and self.width % 4:
            bad("posemb", f"sincos2d needs width divisible by 4, got {self.width}")
        if self.model != "vit" and (self.init, self.gelu) != ("default", "tanh"):
            bad("init", f"init={self.init!r} / gelu={self.gelu!r} choose a ViT flavour; {self.model} follows its own "
                f"official code: leave them at 'default' / 'tanh'")
        if not 0.0 <= self.emb_dropout < 1.0:
            bad("emb_dropout", f"must be in [0, 1), got {self.emb_dropout}")


def parse_variant(model: str, variant: str) -> tuple[str, int]:
    """`'B/16'` -> `('B', 16)`. CRATE variants may omit the patch (`'T'` means `'T/16'`)."""
    if model not in VARIANTS:
        raise ConfigError(f"unknown model {model!r}; expected one of {MODELS}")
    table = VARIANTS[model]
    name, _, patch = variant.partition("/")
    if name not in table:
        raise ConfigError(f"unknown {model} variant {variant!r}; known sizes: {sorted(table)} "
                          f"(written like '{next(iter(table))}/16')")
    if not patch:
        patch = "16"
    if not patch.isdigit() or int(patch) <= 0:
        raise ConfigError(f"variant {variant!r}: the part after '/' must be the patch size, e.g. '{name}/16'")
    return name, int(patch)


def model_config(model: str, variant: str, **overrides) -> ModelConfig:
    """Builds the config of a named variant, e.g. `model_config('crate_alpha', 'L/14', image_size=84)`."""
    name, patch = parse_variant(model, variant)
    width, depth, heads, mlp = VARIANTS[model][name]
    fields = dict(model=model, variant=f"{name}/{patch}", width=width, depth=depth, num_heads=heads,
                  patch_size=patch, mlp_dim=mlp, **_MODEL_DEFAULTS[model])
    fields.update(overrides)
    return ModelConfig.build(**fields)
