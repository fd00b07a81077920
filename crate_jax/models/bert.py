"""Bidirectional (masked-language-model) encoders: CRATE-BERT and the post-LN BERT / RoBERTa baseline.

    tokens [B, T], attention_mask [B, T] (1 = token, 0 = padding), token_types [B, T]
      -> x = LN(word[tokens] + token_type[types] + position[pos])      (eps `layer_norm_eps`)
      -> depth encoder layers (padding masked out of the keys only)     (no final LayerNorm)
      -> MLM head: LN(gelu_erf(x W + b)) Eᵀ + bias  -> logits [B, T, V]  (E: the word embeddings, tied)
      or pooler: tanh(x[:, 0] W + b) -> classifier -> [B, num_labels]     (fine-tuning)

* **CRATE-BERT** (`model='crate_bert'`, the `CrateForMaskedLM` of Hugging Face `transformers` pull request
  #27759): per layer `z = x + Wo · MSSA(LN(x))` with one bias-free `qkv` projection (q = k = v), scores over
  `sqrt(d/h)` and an output map without bias, then `x_next = ReLU(g + 0.1 (g D − g Dᵀ D) − 0.01)`, `g = LN(z)`
  (CRATE's ISTA step, `crate_jax.models.layers.ISTA`), with **no residual**. Both layer LayerNorms use eps
  1e-5 (its `block.ln_eps`), not the config's `layer_norm_eps` (1e-12), which the embeddings and the MLM head use.
* **BERT / RoBERTa** (`model='bert'`): post-LN layers `x = LN(x + Attn(x))`, `x = LN(x + W2 gelu_erf(W1 x))`
  with q / k / v / out and MLP biases, eps `layer_norm_eps` (BERT 1e-12, RoBERTa 1e-5).

Position ids: `positions='roberta'` (CRATE-BERT, RoBERTa) counts tokens from the ids, not the mask:
`pos = cumsum(ids != pad) * (ids != pad) + pad`, so `<pad>` tokens sit at position `pad` and a table of `P`
rows takes at most `P − pad − 1` tokens; `positions='absolute'` (BERT) is `0 .. T−1`. The padding mask
only removes keys (a padded query still attends to the tokens). A row with no token at all attends to
every key (the official additive mask would give it uniform weights instead; such rows carry no text).

Init (our reading of the pull request's `_init_weights`, BERT's): embeddings and Linear N(0, 0.02²), biases
0, LayerNorm 1 / 0; the ISTA dictionary CRATE's kaiming-uniform. Dropout `dropout` acts on the embeddings
and on each residual branch (BERT's hidden dropout); attention-probability dropout is not implemented.

Parameter tree: `embeddings/{word/embedding [V, d], position [P, d], token_type [types, d], norm}`,
`encoder/blocks/... [depth, ...]`, `mlm_head/{dense, norm, bias [V]}`, `pooler/{kernel, bias}`,
`classifier/{kernel, bias}`. The word table's logical axes `("vocab", "embed")` shard the vocabulary over
`tensor` (when `tensor` divides V).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.blocks import CrateBlock, _dtypes, _keys
from crate_jax.models.config import BlockConfig, ConfigError, Serialised
from crate_jax.models.encoder import Encoder
from crate_jax.models.flops import block_flops
from crate_jax.models.text import Embed

BERT_MODELS = ("crate_bert", "bert")
POSITIONS = ("roberta", "absolute")
# name -> (width, depth, heads, MLP width). CRATE-BERT 'base': the pull request's `CrateConfig` defaults
# (RoBERTa-base's shape); 'large': RoBERTa-large's shape, the paper's larger encoder. BERT: the
# `bert-base-uncased` / `bert-large-uncased` configs (MLP 4·width).
BERT_VARIANTS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "crate_bert": {"base": (768, 12, 12, 0), "large": (1024, 24, 16, 0)},
    "bert": {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)},
}
# Vocabulary / position / type tables: RoBERTa's BPE (CRATE-BERT, `roberta-*`) and BERT's WordPiece.
ROBERTA_TABLES = dict(vocab_size=50265, max_positions=514, type_vocab_size=2, pad_token_id=1, positions="roberta")
BERT_TABLES = dict(vocab_size=30522, max_positions=512, type_vocab_size=2, pad_token_id=0, positions="absolute")


@dataclasses.dataclass(frozen=True)
class BertConfig(Serialised):
    """Everything that fixes a masked-LM encoder's parameters and forward pass (a bundle's `model.json`)."""

    kind: ClassVar[str] = "bert"
    what: ClassVar[str] = "BERT"

    model: str
    variant: str
    block: BlockConfig  # CRATE-BERT: CRATE blocks (LayerNorm eps 1e-5); BERT: post-LN blocks (MLP width given 0: 4·width)
    vocab_size: int = 50265
    max_positions: int = 514
    type_vocab_size: int = 2
    pad_token_id: int = 1
    positions: str = "roberta"
    layer_norm_eps: float = 1e-12  # embeddings, MLM head (and BERT's layers)
    mlm_head: bool = True
    pooler: bool = False
    num_labels: int = 0  # > 0: a classifier (1: regression) on the pooled first token; needs the pooler

    def __post_init__(self):
        self.validate()

    @classmethod
    def block_family(cls, own):
        if own.get("model") not in BERT_MODELS:
            raise ConfigError(f"BERT config field 'model': got {own.get('model')!r}, expected one of {BERT_MODELS}")
        return "crate" if own["model"] == "crate_bert" else "vit"

    @classmethod
    def build(cls, **fields):
        eps = fields.pop("block_ln_eps", None)  # older bundles named CRATE-BERT's block eps on its own
        if eps is not None and fields.get("model") == "crate_bert":
            fields.setdefault("ln_eps", eps)
        return super().build(**fields)

    @classmethod
    def complete_block(cls, own, options):
        """CRATE-BERT: the pull request's hard-coded LayerNorm eps 1e-5, no MLP; BERT: its layers' LayerNorm eps
        is `layer_norm_eps`, MLP 4·width unless given, output biases. Never causal."""
        crate = own["model"] == "crate_bert"
        options.setdefault("ln_eps", 1e-5 if crate else own.get("layer_norm_eps", 1e-12))
        options.setdefault("attn_out_bias", not crate)
        options["mlp_dim"] = 0 if crate else (options.get("mlp_dim") or 4 * options["width"])
        options["causal"] = False
        return options

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def dict_size(self) -> int:
        """Width of a layer's code: CRATE-BERT's square ISTA dictionary, BERT's MLP width."""
        return self.block.dict_size

    @property
    def max_tokens(self) -> int:
        """The longest input the position table takes."""
        if self.positions == "roberta":
            return self.max_positions - self.pad_token_id - 1
        return self.max_positions

    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"BERT config field '{field}': {msg}")

        if self.model not in BERT_MODELS:
            bad("model", f"got {self.model!r}, expected one of {BERT_MODELS}")
        if self.positions not in POSITIONS:
            bad("positions", f"got {self.positions!r}, expected one of {POSITIONS}")
        if self.vocab_size < 2 or self.type_vocab_size < 1:
            bad("vocab_size", f"vocab_size must be >= 2 and type_vocab_size >= 1, got {self.vocab_size}, "
                f"{self.type_vocab_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"must be an id of the vocabulary [0, {self.vocab_size}), got {self.pad_token_id}")
        if self.max_tokens < 1:
            bad("max_positions", f"{self.max_positions} rows leave no room for a token with {self.positions} "
                f"positions and pad id {self.pad_token_id} (need > pad + 1)")
        if self.num_labels < 0:
            bad("num_labels", f"must be >= 0 (0: no classifier), got {self.num_labels}")
        if self.num_labels and not self.pooler:
            bad("pooler", "a classifier (num_labels > 0) reads the pooled first token: set pooler=True")


def resolve_variant(model: str, variant: str | None) -> str:
    if model not in BERT_MODELS:
        raise ConfigError(f"unknown BERT model {model!r}; expected one of {BERT_MODELS}")
    name = variant or "base"
    if name not in BERT_VARIANTS[model]:
        raise ConfigError(f"unknown {model} size {variant!r}; known sizes: {sorted(BERT_VARIANTS[model])}")
    return name


def bert_config(model: str, variant: str | None = None, **overrides) -> BertConfig:
    """`bert_config('crate_bert', 'base')`, `bert_config('bert', 'base', **BERT_TABLES)`; CRATE-BERT defaults to
    the RoBERTa tables, BERT to BERT's (WordPiece, absolute positions)."""
    name = resolve_variant(model, variant)
    width, depth, heads, mlp = BERT_VARIANTS[model][name]
    tables = ROBERTA_TABLES if model == "crate_bert" else BERT_TABLES
    fields = dict(model=model, variant=name, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, **tables)
    if "width" in overrides and "mlp_dim" not in overrides and mlp:
        fields["mlp_dim"] = 0  # 4·width of the new width
    fields.update(overrides)
    if (fields["width"], fields["depth"], fields["num_heads"]) != (width, depth, heads):
        fields["variant"] = "custom"
    return BertConfig.build(**fields)


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------
def gelu_erf(x):
    """BERT's exact GELU `x Φ(x)` (the tanh form differs by up to 2e-4 after the head's LayerNorm)."""
    return jax.nn.gelu(x, approximate=False)


def _dense(d_in, d_out, in_axis, out_axis, cfg: BertConfig, rngs, bias=True):
    return L.Dense((d_in,), (d_out,), in_axes=(in_axis,), out_axes=(out_axis,), use_bias=bias, rngs=rngs,
                   kernel_init=L.normal(0.02), dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class PostLNBlock(nnx.Module):
    """BERT's layer: `x = LN1(x + Attn(x))`, `x = LN2(x + fc2(gelu_erf(fc1(x))))` (post-LN, biases everywhere)."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        d, m, init = cfg.width, cfg.mlp_dim, L.normal(0.02)
        self.dropout = cfg.dropout
        self.attn = L.MultiHeadAttention(d, cfg.num_heads, causal=False, attention=cfg.attention, rngs=rngs,
                                         qkv_init=init, out_init=init, **dt)
        self.ln1 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)
        self.fc1 = L.Dense((d,), (m,), in_axes=("embed",), out_axes=("mlp",), use_bias=True, rngs=rngs,
                           kernel_init=init, **dt)
        self.fc2 = L.Dense((m,), (d,), in_axes=("mlp",), out_axes=("embed",), use_bias=True, rngs=rngs,
                           kernel_init=init, **dt)
        self.ln2 = L.LayerNorm(d, eps=cfg.ln_eps, rngs=rngs, **dt)

    def __call__(self, x, *, key=None, drop_rate=0.0, mask=None, capture=None):
        del drop_rate  # BERT has no stochastic depth
        k1, k2 = _keys(key, 2)
        x = self.ln1(x + L.dropout(self.attn(x, mask=mask, capture=capture), self.dropout, k1))
        h = gelu_erf(self.fc1(x))
        if capture is not None:
            capture["code"] = h
        return self.ln2(x + L.dropout(self.fc2(h), self.dropout, k2))


class Embeddings(nnx.Module):
    """`LN(word[ids] + token_type[types] + position[pos])` with RoBERTa's or BERT's position ids."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.width, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.word = Embed(cfg.vocab_size, d, rngs=rngs, param_dtype=pd)
        self.position = L.param(rngs, L.normal(0.02), (cfg.max_positions, d), ("tokens", "embed"), pd)
        self.token_type = L.param(rngs, L.normal(0.02), (cfg.type_vocab_size, d), (None, "embed"), pd)
        self.norm = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pd)

    def position_ids(self, tokens: jax.Array) -> jax.Array:
        if self.cfg.positions == "absolute":
            return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        pad = self.cfg.pad_token_id
        real = (tokens != pad).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + pad

    def __call__(self, tokens, token_types, key=None):
        x = (self.word(tokens) + jnp.take(self.token_type[...], token_types, axis=0)
             + jnp.take(self.position[...], self.position_ids(tokens), axis=0))
        return L.dropout(self.norm(x), self.cfg.dropout, key)


class MLMHead(nnx.Module):
    """`LN(gelu_erf(x W + b)) Eᵀ + bias`: the decoder is the word embedding table (tied), the bias its own."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.width, jnp.dtype(cfg.param_dtype)
        self.dense = _dense(d, d, "embed", "mlp", cfg, rngs)
        self.norm = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pd)
        self.bias = L.param(rngs, L.zeros, (cfg.vocab_size,), ("vocab",), pd)

    def __call__(self, x, embed: Embed):
        h = self.norm(gelu_erf(self.dense(x)))
        return embed.attend(h) + self.bias[...].astype(h.dtype)


class MaskedEncoder(nnx.Module):
    """`model(tokens, attention_mask=None, token_types=None)`: MLM logits `[B, T, V]`, class logits
    `[B, num_labels]` (a classifier), or the hidden states `[B, T, d]` (neither head)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.width
        self.embeddings = Embeddings(cfg, rngs=rngs)
        if cfg.model == "crate_bert":
            init = L.normal(0.02)
            self.encoder = Encoder(cfg.block, CrateBlock, rngs=rngs,
                                   block_kwargs={"inits": dict(proj=init, out=init, out_bias=L.zeros)})
        else:
            self.encoder = Encoder(cfg.block, PostLNBlock, rngs=rngs)
        self.mlm_head = MLMHead(cfg, rngs=rngs) if cfg.mlm_head else None
        self.pooler = _dense(d, d, "embed", "mlp", cfg, rngs) if cfg.pooler else None
        self.classifier = _dense(d, cfg.num_labels, "embed", "classes", cfg, rngs) if cfg.num_labels else None

    def check_tokens(self, tokens) -> None:
        T = self.cfg.max_tokens
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= T:
            why = (f" ({self.cfg.max_positions} position rows, pad id {self.cfg.pad_token_id}: RoBERTa-style "
                   f"positions start at pad + 1)" if self.cfg.positions == "roberta" else "")
            raise ConfigError(f"tokens of shape {tuple(tokens.shape)} do not fit this encoder, which takes [B, T] "
                              f"with 1 <= T <= {T}{why}")

    def key_mask(self, attention_mask):
        """`[B, 1, 1, T]` bool, True on real keys; a row without any token keeps all its keys (no NaN)."""
        if attention_mask is None:
            return None
        keep = attention_mask.astype(bool)
        keep = keep | ~jnp.any(keep, axis=1, keepdims=True)
        return keep[:, None, None, :]

    def hidden(self, tokens, attention_mask=None, token_types=None, *, train=False, rng=None, capture=False):
        """The encoder's output `[B, T, d]` (and the per-layer captures)."""
        self.check_tokens(tokens)
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        k_emb, k_enc = (None, None) if (rng is None or not train) else tuple(jax.random.split(rng))
        x = self.embeddings(tokens, token_types, k_emb).astype(jnp.dtype(self.cfg.dtype))
        x_in = x
        x, caps = self.encoder(x, key=k_enc, mask=self.key_mask(attention_mask), capture=capture)
        return x, (dict(caps, tokens_in=x_in, tokens_out=x) if capture else {})

    def pooled(self, x):
        return jnp.tanh(self.pooler(x[:, 0]))

    def __call__(self, tokens, attention_mask=None, token_types=None, *, train: bool = False,
                 rng: jax.Array | None = None, capture: bool = False):
        x, caps = self.hidden(tokens, attention_mask, token_types, train=train, rng=rng, capture=capture)
        if self.classifier is not None:
            out = self.classifier(self.pooled(x))
        elif self.mlm_head is not None:
            out = self.mlm_head(x, self.embeddings.word)
        else:
            out = x
        return (out, caps) if capture else out


def build_bert(cfg: BertConfig, seed: int | jax.Array = 0) -> MaskedEncoder:
    """A freshly initialised encoder (the constructor of bundle kind 'bert')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return MaskedEncoder(cfg, rngs=nnx.Rngs(params=key))


def param_count(cfg: BertConfig) -> int:
    """Parameters in closed form (the tied decoder counted once): embeddings `(V + P + types)·d + 2d`; per
    layer CRATE-BERT `3d² + 4d`, BERT `4d² + 2dh + 9d + h`; MLM head `d² + 3d + V`; pooler `d² + d`;
    classifier `(d + 1)·labels`."""
    d, V, h = cfg.width, cfg.vocab_size, cfg.block.mlp_dim
    per = 3 * d * d + 4 * d if cfg.model == "crate_bert" else 4 * d * d + 2 * d * h + 9 * d + h
    n = (V + cfg.max_positions + cfg.type_vocab_size) * d + 2 * d + cfg.depth * per
    n += (d * d + 3 * d + V) if cfg.mlm_head else 0
    n += (d * d + d) if cfg.pooler else 0
    return n + (d + 1) * cfg.num_labels


def forward_flops_per_token(cfg: BertConfig, context: int | None = None) -> int:
    """Forward FLOPs per token at length `context` (default `max_tokens`): the layers' matmuls and attention
    (`crate_jax.models.flops.block_flops`, ISTA's `D` counted three times) plus the MLM head."""
    T = context or cfg.max_tokens
    head = (2 * cfg.width * cfg.width + 2 * cfg.width * cfg.vocab_size) if cfg.mlm_head else 0
    return cfg.depth * block_flops(cfg.block, T) // T + head


def train_flops_per_token(cfg: BertConfig, context: int | None = None) -> int:
    return 3 * forward_flops_per_token(cfg, context)


def with_head(cfg: BertConfig, *, num_labels: int) -> BertConfig:
    """The same encoder as a sequence classifier (pooler + `num_labels` outputs, no MLM head)."""
    return cfg.replace(mlm_head=False, pooler=True, num_labels=num_labels)


