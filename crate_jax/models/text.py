"""Text towers (docs/math.md §CLIPA): token embedding, learned positions, a stack of encoder blocks, final LN,
pooling and a projection head.

`tower(tokens [B, L]) -> [B, out_dim]` (unnormalised). The blocks are the ViT block (MHA with
q/k/v/out biases + gelu-tanh MLP: the official CLIPA tower) or CRATE / CRATE-α blocks for a fully
white-box text tower. Options: padding mask (keys with the pad id 0 are not attended), causal mask,
pooling at the last position (official), the first token ([CLS]) or the last non-pad token.

Parameter tree: `embed/embedding [V, w]`, `pos_embedding [1, L, w]`, `encoder/blocks/... [depth, ...]`,
`encoder_norm/...`, `head/kernel [w, E]`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.blocks import BLOCKS, ViTBlock
from crate_jax.models.config import BlockConfig, ConfigError, Serialised
from crate_jax.models.encoder import Encoder

PAD_ID = 0
TEXT_MODELS = ("transformer", "crate", "crate_alpha")
TEXT_POOLS = ("last", "cls", "eos")
# name -> (width, depth, heads, mlp width). B / L / H: CLIPA `text_transformer.decode_variant`
# (docs/math.md §CLIPA); the smaller ones are ours, for experiments and the demo.
TEXT_VARIANTS = {
    "mu": (64, 2, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (512, 12, 8, 2048),
    "L": (768, 12, 12, 3072),
    "H": (1024, 24, 16, 4096),
}


@dataclasses.dataclass(frozen=True)
class TextConfig(Serialised):
    """The text tower. Tokens are `[B, max_len]` int32 with pad id 0; `block` is its encoder's `BlockConfig`."""

    what: ClassVar[str] = "text"  # names it in errors (Serialised)

    model: str
    variant: str
    block: BlockConfig
    vocab_size: int = 32_000
    max_len: int = 32
    pool: str = "last"
    pad_mask: bool = False  # official: no attention mask at all (docs/math.md §CLIPA)
    final_ln_eps: float = 1e-6

    def __post_init__(self):
        self.validate()

    @classmethod
    def block_family(cls, own):
        return "vit" if own.get("model", "transformer") == "transformer" else own["model"]

    @classmethod
    def complete_block(cls, own, options):
        """The tower's blocks: MLP width only for the transformer, output bias except on CRATE-α."""
        family = cls.block_family(own)
        options.setdefault("attn_out_bias", family != "crate_alpha")
        if family != "vit":
            options["mlp_dim"] = 0
        return options

    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"text config field '{field}': {msg}")
        if self.model not in TEXT_MODELS:
            bad("model", f"got {self.model!r}, expected one of {TEXT_MODELS}")
        if self.pool not in TEXT_POOLS:
            bad("pool", f"got {self.pool!r}, expected one of {TEXT_POOLS}")
        if self.vocab_size < 2 or self.max_len < 1:
            bad("vocab_size", f"vocab_size must be >= 2 and max_len >= 1, got {self.vocab_size}, {self.max_len}")
        if self.model == "transformer" and self.mlp_dim <= 0:
            bad("mlp_dim", "the transformer text tower needs a positive MLP width")


def text_config(variant: str = "H", model: str = "transformer", **overrides) -> TextConfig:
    """`text_config('H', vocab_size=32000, max_len=32)`: a named size from `TEXT_VARIANTS`."""
    if variant not in TEXT_VARIANTS:
        raise ConfigError(f"unknown text variant {variant!r}; known: {sorted(TEXT_VARIANTS)}")
    w, d, k, m = TEXT_VARIANTS[variant]
    fields = dict(model=model, variant=variant, width=w, depth=d, num_heads=k, mlp_dim=m)
    fields.update(overrides)
    return TextConfig.build(**fields)


class Embed(nnx.Module):
    """Token embedding table `embedding [V, w]` (flax `nn.Embed`), init N(0, 0.02²) (docs/math.md §CLIPA)."""

    def __init__(self, vocab: int, width: int, *, rngs: nnx.Rngs, param_dtype):
        self.embedding = L.param(rngs, L.normal(0.02), (vocab, width), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """`[B, L]` int -> `[B, L, w]`."""
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """`[B, L, w] -> [B, L, V]`: the tied output head `x Eᵀ` (language models)."""
        return jnp.einsum("blw,vw->blv", x, self.embedding[...].astype(x.dtype))


class TextTower(nnx.Module):
    """`tower(tokens [B, L]) -> [B, out_dim]` (unnormalised)."""

    def __init__(self, cfg: TextConfig, out_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w, pd = cfg.width, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        # pos N(0, 0.01²) (docs/math.md §CLIPA).
        self.embed = Embed(cfg.vocab_size, w, rngs=rngs, param_dtype=pd)
        self.pos_embedding = L.param(rngs, L.normal(0.01), (1, cfg.max_len, w), (None, "tokens", "embed"), pd)
        if cfg.model == "transformer":
            # q/k/v N(0, 1/w); out and MLP-out N(0, 1/(w·2·12)) (the init uses the default depth 12,
            # not the real one); MLP-in N(0, 1/(2w)); biases 0 (docs/math.md §CLIPA).
            inits = dict(qkv=L.normal(w ** -0.5), out=L.normal((w * 24) ** -0.5),
                         mlp_in=L.normal((2 * w) ** -0.5), mlp_out=L.normal((w * 24) ** -0.5), mlp_bias=L.zeros)
            self.encoder = Encoder(cfg.block, ViTBlock, rngs=rngs, block_kwargs={"inits": inits})
        else:
            self.encoder = Encoder(cfg.block, BLOCKS[cfg.model], rngs=rngs)
        self.encoder_norm = L.LayerNorm(w, eps=cfg.final_ln_eps, rngs=rngs, dtype=self.dtype, param_dtype=pd)
        self.head = L.Dense((w,), (out_dim,), in_axes=("embed",), out_axes=("classes",), use_bias=False,
                            rngs=rngs, kernel_init=L.normal(w ** -0.5), dtype=self.dtype, param_dtype=pd)

    def attention_mask(self, tokens: jax.Array) -> jax.Array | None:
        """`[B, 1, 1, L]` bool, True on non-pad keys (position 0 always kept, so that an all-pad row
        still has one key and never produces NaN); None without `pad_mask`."""
        if not self.cfg.pad_mask:
            return None
        keep = (tokens != PAD_ID) | (jnp.arange(tokens.shape[1]) == 0)[None, :]
        return keep[:, None, None, :]

    def __call__(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.shape[1] != cfg.max_len:
            raise ConfigError(f"text tokens of shape {tuple(tokens.shape)} do not fit this text tower, which expects "
                              f"[B, {cfg.max_len}] (text max_len); tokenise with max_len={cfg.max_len}")
        x = self.embed(tokens).astype(self.dtype)
        x = x + self.pos_embedding[...].astype(self.dtype)
        x, _ = self.encoder(x, key=rng if train else None, mask=self.attention_mask(tokens))
        x = self.encoder_norm(x)
        if cfg.pool == "last":
            feat = x[:, -1]
        elif cfg.pool == "cls":
            feat = x[:, 0]
        else:  # 'eos': the last non-pad token
            last = jnp.maximum(jnp.sum(tokens != PAD_ID, axis=1) - 1, 0)
            feat = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return self.head(feat)
