"""Causal language models: CRATE-GPT (docs/math.md §Language models), a CRATE-α LM and the GPT-2 baseline, one pipeline.

    tokens [B, T] int -> x = wte[tokens] + wpe[:T] -> depth causal blocks -> [final LN] -> x wteᵀ -> logits [B, T, V]

* **CRATE-GPT** (`model='crate_gpt'`, docs/math.md §Language models, CRATE pull request #13): per block
  `x = x + c_proj(causal-MSSA(LN1(x)))` with one shared projection `U` (`c_attn`, no bias) and
  `c_proj` with bias, then one ISTA step `x = ISTA(LN2(x))` with **no residual** (docs/math.md §CRATE);
  LayerNorm eps 1e-5; **no final LayerNorm**; head tied to the token embedding. Init: embeddings and
  Linear N(0, 0.02²), `c_proj.weight` N(0, 0.02²/(2·depth)), biases 0, ISTA kaiming-uniform.
* **CRATE-α LM** (`model='crate_alpha'`): the same causal stack with the CRATE-α block (docs/math.md §CRATE-α):
  MSSA without output bias, then the ODL block (`odl_ratio`, `odl_steps`, `odl_decoupled` `D1`,
  `odl_residual`; `eta`, `lmbda`), LayerNorm eps 1e-6, plus the final LayerNorm and the tied head an
  LM needs. There is no official CRATE-α LM code; the init is the image model's (docs/math.md §CRATE-α).
* **GPT-2** (`model='gpt2'`): pre-LN blocks, q/k/v/out with biases, GELU(tanh) MLP of `4d`, final
  LayerNorm, tied head, LayerNorm eps 1e-5, the nanoGPT / GPT-2 init (as CRATE-GPT's, with the
  residual projections `c_proj` and `mlp.c_proj` scaled by 1/sqrt(2·depth)).

Parameter tree: `embed/embedding [V', d]` (the tied head; `V'` = `vocab_size` rounded up to
`vocab_multiple`, the padded rows masked out of the logits), `pos_embedding [block_size, d]`,
`encoder/blocks/... [depth, ...]`, and `final_norm/{scale, bias}` (CRATE-α, GPT-2). The embedding's
logical axes `("vocab", "embed")` shard the vocabulary over `tensor` (when `tensor` divides `V'`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.blocks import CrateAlphaBlock, CrateBlock, ViTBlock
from crate_jax.models.config import BlockConfig, ConfigError, Serialised
from crate_jax.models.encoder import Encoder
from crate_jax.models.flops import block_flops
from crate_jax.models.text import Embed

LM_MODELS = ("crate_gpt", "crate_alpha", "gpt2")
FAMILY = {"crate_gpt": "crate", "crate_alpha": "crate_alpha", "gpt2": "vit"}
BLOCK_CLASSES = {"crate_gpt": CrateBlock, "crate_alpha": CrateAlphaBlock, "gpt2": ViTBlock}

# name -> (width d, depth, heads K). CRATE-GPT: `CRATE.from_pretrained` of pull request #13 (docs/math.md §Language models);
# GPT-2: the four OpenAI / Hugging Face sizes. CRATE-α: the image model's S / B / L widths, depths and
# heads (docs/math.md §Sizes) -- our choice: the CRATE-α paper's language-model sizes could not be confirmed from
# any source available here (see README, "White-box language models").
LM_VARIANTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "crate_gpt": {"crate": (768, 12, 12), "crate-medium": (1024, 24, 16), "crate-large": (1280, 36, 20),
                  "crate-xl": (1600, 48, 25)},
    "gpt2": {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
             "gpt2-xl": (1600, 48, 25)},
    "crate_alpha": {"S": (576, 12, 12), "B": (768, 12, 12), "L": (1024, 24, 16)},
}
# Size words that work for every model: 'small' is the 12-layer size of each.
ALIASES: dict[str, dict[str, str]] = {
    "crate_gpt": {"small": "crate", "medium": "crate-medium", "large": "crate-large", "xl": "crate-xl"},
    "gpt2": {"small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large", "xl": "gpt2-xl"},
    "crate_alpha": {"small": "S", "base": "B", "large": "L"},
}
DEFAULT_VARIANT = {"crate_gpt": "crate", "gpt2": "gpt2", "crate_alpha": "B"}
GPT2_VOCAB, GPT2_BLOCK = 50257, 1024

_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "crate_gpt": dict(ln_eps=1e-5, final_norm=False, final_ln_eps=1e-5),
    "crate_alpha": dict(ln_eps=1e-6, final_norm=True, final_ln_eps=1e-6),
    "gpt2": dict(ln_eps=1e-5, final_norm=True, final_ln_eps=1e-5),
}


@dataclasses.dataclass(frozen=True)
class LMConfig(Serialised):
    """Everything that fixes a language model's parameters and forward pass (a bundle's `model.json`).

    Tokens are `[B, T]` ints with `T <= block_size`; logits `[B, T, vocab_size]` (the model computes
    `table_size` columns and masks the padding ones).
    """

    kind: ClassVar[str] = "lm"
    what: ClassVar[str] = "language-model"  # names it in errors (Serialised)

    model: str
    variant: str
    block: BlockConfig  # causal blocks; `mlp_dim` is GPT-2's MLP width (given 0: 4·width)
    vocab_size: int = GPT2_VOCAB
    vocab_multiple: int = 1  # pad the embedding table to a multiple of this (nanoGPT: 64 -> 50304)
    block_size: int = GPT2_BLOCK
    final_norm: bool = False
    final_ln_eps: float = 1e-5
    emb_dropout: float = 0.0
    # block.dropout: after the attention output and the MLP / ISTA / ODL output (residual dropout)

    def __post_init__(self):
        self.validate()

    @classmethod
    def block_family(cls, own):
        if own.get("model") not in FAMILY:
            raise ConfigError(f"language-model config field 'model': got {own.get('model')!r}, expected one of "
                              f"{LM_MODELS}")
        return FAMILY[own["model"]]

    @classmethod
    def complete_block(cls, own, options):
        """Causal blocks; GPT-2's MLP 4·width unless given, CRATE-GPT's output bias."""
        options.setdefault("ln_eps", 1e-5)
        options.setdefault("attn_out_bias", own["model"] == "crate_gpt")
        options["causal"] = True
        if own["model"] == "gpt2":
            options["mlp_dim"] = options.get("mlp_dim") or 4 * options["width"]
        else:
            options["mlp_dim"] = 0
        return options

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def table_size(self) -> int:
        """Rows of the embedding table: `vocab_size` rounded up to a multiple of `vocab_multiple`."""
        m = max(1, self.vocab_multiple)
        return -(-self.vocab_size // m) * m

    @property
    def family(self) -> str:
        return FAMILY[self.model]

    @property
    def dict_size(self) -> int:
        return self.block.dict_size

    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"language-model config field '{field}': {msg}")

        if self.model not in LM_MODELS:
            bad("model", f"got {self.model!r}, expected one of {LM_MODELS}")
        if self.vocab_size < 2:
            bad("vocab_size", f"must be >= 2, got {self.vocab_size}")
        if self.vocab_multiple < 1:
            bad("vocab_multiple", f"must be >= 1, got {self.vocab_multiple}")
        if self.block_size < 1:
            bad("block_size", f"must be >= 1, got {self.block_size}")
        if not 0.0 <= self.emb_dropout < 1.0:
            bad("emb_dropout", f"must be in [0, 1), got {self.emb_dropout}")
        if not self.block.causal:
            bad("causal", "a language model's blocks are causal")


def resolve_variant(model: str, variant: str | None) -> str:
    """The table name of `variant` for `model` (aliases such as 'small' resolved); '' -> the default."""
    if model not in LM_MODELS:
        raise ConfigError(f"unknown language model {model!r}; expected one of {LM_MODELS}")
    if not variant:
        return DEFAULT_VARIANT[model]
    table = LM_VARIANTS[model]
    name = ALIASES[model].get(variant, variant)
    if name not in table:
        raise ConfigError(f"unknown {model} size {variant!r}; known sizes: {sorted(table)} "
                          f"(or {sorted(ALIASES[model])})")
    return name


def lm_config(model: str, variant: str | None = None, **overrides) -> LMConfig:
    """`lm_config('crate_gpt', 'crate')`, `lm_config('gpt2', 'small', block_size=256, width=128, depth=4)`.

    Width / depth / heads come from the size table unless overridden (then the variant name records
    the table size the run started from)."""
    name = resolve_variant(model, variant)
    width, depth, heads = LM_VARIANTS[model][name]
    fields = dict(model=model, variant=name, width=width, depth=depth, num_heads=heads, **_MODEL_DEFAULTS[model])
    fields.update(overrides)
    if (fields["width"], fields["depth"], fields["num_heads"]) != (width, depth, heads):
        fields["variant"] = "custom"
    return LMConfig.build(**fields)


def _block_kwargs(cfg: LMConfig) -> dict:
    """nanoGPT init (docs/math.md §Language models): N(0, 0.02²), residual projections N(0, 0.02²/(2·depth)), biases 0."""
    std, resid = 0.02, 0.02 / math.sqrt(2 * cfg.depth)
    if cfg.model == "crate_gpt":
        return {"inits": dict(proj=L.normal(std), out=L.normal(resid), out_bias=L.zeros)}
    if cfg.model == "gpt2":
        return {"inits": dict(qkv=L.normal(std), out=L.normal(resid), mlp_in=L.normal(std), mlp_out=L.normal(resid),
                              mlp_bias=L.zeros)}
    return {}


class LanguageModel(nnx.Module):
    """`model(tokens [B, T]) -> logits [B, T, vocab_size]` (in the compute dtype)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.width, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.table_size, d, rngs=rngs, param_dtype=pd)  # wte, N(0, 0.02²)
        self.pos_embedding = L.param(rngs, L.normal(0.02), (cfg.block_size, d), ("tokens", "embed"), pd)  # wpe
        self.encoder = Encoder(cfg.block, BLOCK_CLASSES[cfg.model], rngs=rngs, block_kwargs=_block_kwargs(cfg))
        self.final_norm = (L.LayerNorm(d, eps=cfg.final_ln_eps, rngs=rngs, dtype=self.dtype, param_dtype=pd)
                           if cfg.final_norm else None)

    def check_tokens(self, tokens) -> None:
        T = self.cfg.block_size
        if tokens.ndim != 2 or tokens.shape[1] > T or tokens.shape[1] < 1:
            raise ConfigError(f"tokens of shape {tuple(tokens.shape)} do not fit this language model, which takes "
                              f"[B, T] with 1 <= T <= block_size = {T}")

    def embed_tokens(self, tokens: jax.Array, offset: int | jax.Array = 0, key=None) -> jax.Array:
        """`wte[tokens] + wpe[offset : offset + T]`, `[B, T, d]` in the compute dtype."""
        T = tokens.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embedding[...], offset, T, axis=0)
        x = (self.embed(tokens) + pos[None]).astype(self.dtype)
        return L.dropout(x, self.cfg.emb_dropout, key)

    def head(self, x: jax.Array) -> jax.Array:
        """`[B, T, d] -> [B, T, table_size]`: final LN (if any), tied head `x wteᵀ`, padding rows masked."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.embed.attend(x.astype(self.dtype))
        cfg = self.cfg
        if cfg.table_size > cfg.vocab_size:  # padded rows never win and take no probability mass
            keep = jnp.arange(cfg.table_size) < cfg.vocab_size
            logits = jnp.where(keep, logits, jnp.asarray(-1e9, logits.dtype))
        return logits

    def __call__(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None,
                 capture: bool = False):
        """Logits `[B, T, table_size]`; with `capture=True`, `(logits, captures)` with the per-layer
        `[depth, B, T, ...]` intermediates (`mssa_w`, `code`, `out`) and `tokens_in` (the embeddings)."""
        self.check_tokens(tokens)
        k_emb, k_enc = (None, None) if (rng is None or not train) else tuple(jax.random.split(rng))
        x = self.embed_tokens(tokens, 0, k_emb)
        x_in = x
        x, caps = self.encoder(x, key=k_enc, capture=capture)
        logits = self.head(x)
        if capture:
            return logits, dict(caps, tokens_in=x_in, tokens_out=x)
        return logits


def build_lm(cfg: LMConfig, seed: int | jax.Array = 0) -> LanguageModel:
    """A freshly initialised language model (the constructor of bundle kind 'lm')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return LanguageModel(cfg, rngs=nnx.Rngs(params=key))


def param_count(cfg: LMConfig) -> int:
    """Parameters of `cfg` in closed form (the tied head counted once, position table included):
    CRATE-GPT `3d² + 5d` per block (docs/math.md §Language models), CRATE-α `2d² + 2dm + 4d` (`m` = dictionary width,
    one `D` if not decoupled), GPT-2 `4d² + 2dh + 9d + h` (`h` = MLP width)."""
    d, m, h = cfg.width, cfg.dict_size, cfg.block.mlp_dim
    per = {"crate_gpt": 3 * d * d + 5 * d,
           "crate_alpha": 2 * d * d + (2 if cfg.odl_decoupled else 1) * d * m + 4 * d,
           "gpt2": 4 * d * d + 2 * d * h + 9 * d + h}[cfg.model]
    return cfg.table_size * d + cfg.block_size * d + cfg.depth * per + (2 * d if cfg.final_norm else 0)


def forward_flops_per_token(cfg: LMConfig, context: int | None = None) -> int:
    """Forward FLOPs per token at context length `context` (default `block_size`): every matmul counted
    with its reuse (CRATE's ISTA applies `D` three times, the ODL block `D` 2·steps−1 times and `D1`
    once), so for GPT-2 this is `2N` (N without the position table) plus attention `4·depth·d·T`."""
    T = context or cfg.block_size
    return cfg.depth * block_flops(cfg.block, T) // T + 2 * cfg.width * cfg.table_size


def train_flops_per_token(cfg: LMConfig, context: int | None = None) -> int:
    """Forward + backward = 3 × forward: the `6N + 12·depth·d·T` count of nanoGPT / PaLM, with N counting
    each use of a weight matrix."""
    return 3 * forward_flops_per_token(cfg, context)
