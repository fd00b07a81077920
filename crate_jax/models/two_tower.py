"""CLIPA two-tower model (docs/math.md §CLIPA): an image tower, a text tower, L2-normalised projections and a
shared learnable temperature.

* Image tower `img`: an `ImageClassifier` (CRATE-α by default, or CRATE / ViT) whose head is the
  projection: `num_classes = out_dim`, no stem bias, no head bias (docs/math.md §CLIPA). Optional random
  patch dropping before the encoder (token reduction in training, `crate_jax.models.masking`).
* Text tower `txt`: `crate_jax.models.text.TextTower`.
* `z ← z / (‖z‖ + 1e-8)` on both sides; `t` `[1]` is a log-scale (init `log(1/0.07)`), the logit
  multiplier is `exp(t)`; the SigLIP loss adds a learnable bias `b` `[1]`.

Parameter tree: `img/...` (as `ImageClassifier`), `txt/...` (as `TextTower`), `t [1]` (and `b [1]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.classifier import ImageClassifier
from crate_jax.models.config import ConfigError, ModelConfig, check_fields, model_config
from crate_jax.models.masking import drop_patches
from crate_jax.models.text import TextConfig, TextTower, text_config

LOSSES = ("softmax", "sigmoid")
# CLIPA's projection width by the first letter of the image variant (docs/math.md §CLIPA).
OUT_DIMS = {"T": 192, "S": 384, "B": 1024, "L": 1024, "H": 1024}


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """Both towers plus the contrastive head. `to_dict` / `from_dict` round-trip through JSON."""

    kind: ClassVar[str] = "two_tower"  # the bundle kind (crate_jax.models.registry)

    image: ModelConfig
    text: TextConfig
    out_dim: int = 1024
    loss: str = "softmax"
    temperature_init: float = 1.0 / 0.07
    bias_init: float = -10.0  # SigLIP only
    mask_ratio: float = 0.0  # fraction of patch tokens dropped in training (0: CLIPA's recipe)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"two-tower config field 'loss': got {self.loss!r}, expected one of {LOSSES}")
        if self.image.num_classes != self.out_dim:
            raise ConfigError(f"the image tower's head is the projection: image.num_classes "
                              f"({self.image.num_classes}) must equal out_dim ({self.out_dim})")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"two-tower config field 'mask_ratio': must be in [0, 1), got {self.mask_ratio}")
        if self.temperature_init <= 0:
            raise ConfigError(f"temperature_init must be positive, got {self.temperature_init}")
        self.text.validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image"], d["text"] = self.image.to_dict(), self.text.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TwoTowerConfig":
        d = dict(d)
        check_fields(cls, d, "two-tower")
        return cls(image=ModelConfig.from_dict(d.pop("image")), text=TextConfig.from_dict(d.pop("text")), **d)

    def replace(self, **changes) -> "TwoTowerConfig":
        return dataclasses.replace(self, **changes)


def two_tower_config(image_model: str = "crate_alpha", image_variant: str = "L/14", *, image_size: int = 84,
                     text: TextConfig | None = None, out_dim: int | None = None, loss: str = "softmax",
                     mask_ratio: float = 0.0, image_overrides: dict | None = None, **kw) -> TwoTowerConfig:
    """The CLIPA two-tower config for an image variant; `out_dim` defaults to CLIPA's table."""
    if out_dim is None:
        out_dim = OUT_DIMS.get(image_variant[0], 1024)
    img = model_config(image_model, image_variant, image_size=image_size, num_classes=out_dim, stem_bias=False,
                       head_bias=False, **(image_overrides or {}))
    if loss == "sigmoid":
        kw.setdefault("temperature_init", 10.0)  # SigLIP init: t' = log 10, b = -10
    return TwoTowerConfig(image=img, text=text or text_config("H"), out_dim=out_dim, loss=loss,
                          mask_ratio=mask_ratio, **kw)


def l2_normalize(z: jax.Array) -> jax.Array:
    """`z / (‖z‖₂ + 1e-8)` over the last axis, in float32 (docs/math.md §CLIPA)."""
    z = z.astype(jnp.float32)
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


class TwoTower(nnx.Module):
    """`model(images [B, H, W, 3], tokens [B, L]) -> (zimg [B, E], ztxt [B, E], {'t', 'b'})`."""

    def __init__(self, cfg: TwoTowerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.img = ImageClassifier(cfg.image, rngs=rngs)
        if cfg.image.model == "vit":  # ImageClassifier zero-inits a ViT head; a zero projection has no
            d = cfg.image.width     # usable gradient through the L2 norm, so use a lecun-normal one.
            self.img.head.kernel[...] = L.normal(d ** -0.5)(rngs.params(), (d, cfg.out_dim),
                                                            jnp.dtype(cfg.image.param_dtype))
        self.txt = TextTower(cfg.text, cfg.out_dim, rngs=rngs)
        self.t = L.param(rngs, lambda k, s, dt: jnp.full(s, math.log(cfg.temperature_init), dt), (1,), (None,),
                         jnp.float32)
        if cfg.loss == "sigmoid":
            self.b = L.param(rngs, lambda k, s, dt: jnp.full(s, cfg.bias_init, dt), (1,), (None,), jnp.float32)
        else:
            self.b = None

    def encode_image(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> jax.Array:
        """Normalised `[B, E]` from normalised NHWC images; in training, drops `mask_ratio` of the patches."""
        img = self.img
        k_emb = k_enc = k_mask = None
        if train and rng is not None:
            k_emb, k_enc, k_mask = jax.random.split(rng, 3)
        x = img.embed(images, k_emb)
        if train and self.cfg.mask_ratio > 0:
            if k_mask is None:
                raise ValueError("patch dropping (mask_ratio > 0) in training needs an rng")
            x = drop_patches(x, self.cfg.mask_ratio, k_mask)
        x, _ = img.encoder(x, key=k_enc)
        return l2_normalize(img.head(img.pool(x)))

    def encode_text(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> jax.Array:
        return l2_normalize(self.txt(tokens, train=train, rng=rng))

    def logit_params(self) -> dict:
        """`{'t': exp(t) (scalar), 'b': bias or None}`."""
        return {"t": jnp.exp(self.t[...].astype(jnp.float32))[0],
                "b": None if self.b is None else self.b[...].astype(jnp.float32)[0]}

    def __call__(self, images=None, tokens=None, *, train: bool = False, rng: jax.Array | None = None):
        k_img, k_txt = (None, None) if rng is None else tuple(jax.random.split(rng))
        zimg = None if images is None else self.encode_image(images, train=train, rng=k_img)
        ztxt = None if tokens is None else self.encode_text(tokens, train=train, rng=k_txt)
        return zimg, ztxt, self.logit_params()


def build_two_tower(cfg: TwoTowerConfig, seed: int | jax.Array = 0) -> TwoTower:
    """A freshly initialised two-tower model (the constructor of bundle kind 'two_tower')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return TwoTower(cfg, rngs=nnx.Rngs(params=key))
