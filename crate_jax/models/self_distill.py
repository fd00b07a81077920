"""The SimDINO student / teacher network: any image backbone (CRATE, CRATE-α or ViT, an `ImageClassifier`
without a head) plus the DINO projection head (`crate_jax.models.heads.DINOHead`).

Multi-crop training feeds the backbone views of two resolutions (global and local crops). As DINO's ViT
does (`interpolate_pos_encoding`), a learned position embedding is resampled to the view's patch grid,
the cls row kept: with `pos_resize='jax'` by `jax.image.resize` (bicubic, antialiased when shrinking), with
`pos_resize='dino'` exactly as DINO does (torch bicubic, `crate_jax.models.posemb.resample_dino`); a sincos
table is regenerated for the grid.

Parameter tree: `backbone/...` (exactly an `ImageClassifier` with `num_classes = 0`, so the backbone
exports as a classifier bundle and initialises a classifier), `head/layers/{0,1,2}/{kernel, bias}`, and
with DINO's prototypes `head/last_layer/{v, g}` (`g` only without `norm_last_layer`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models import posemb
from crate_jax.models.classifier import ImageClassifier, patchify
from crate_jax.models.config import ConfigError, ModelConfig, check_fields, model_config
from crate_jax.models.flops import forward_flops
from crate_jax.models.heads import DINOHead


@dataclasses.dataclass(frozen=True)
class SelfDistillConfig:
    """Backbone (a headless `ModelConfig`, its `image_size` the global-crop size) + DINO head sizes."""

    kind: ClassVar[str] = "self_distill"  # the bundle kind (crate_jax.models.registry)

    backbone: ModelConfig
    head_hidden: int = 2048
    head_dim: int = 256
    head_layers: int = 3
    prototypes: int = 0  # DINO's K prototypes (weight-normalised last layer, `heads.PrototypeLayer`); 0: SimDINO
    norm_last_layer: bool = True  # DINO: the last layer's scale g fixed at 1

    def __post_init__(self):
        if self.backbone.num_classes != 0:
            raise ConfigError(f"the self-distillation backbone has no classification head: backbone.num_classes must "
                              f"be 0, got {self.backbone.num_classes}")
        if self.prototypes < 0:
            raise ConfigError(f"self-distillation config field 'prototypes' must be >= 0 (0: none), got {self.prototypes}")
        for field in ("head_hidden", "head_dim", "head_layers"):
            if getattr(self, field) < 1:
                raise ConfigError(f"self-distillation config field '{field}' must be >= 1, got {getattr(self, field)}")

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelfDistillConfig":
        d = dict(d)
        check_fields(cls, d, "self-distillation")
        return cls(backbone=ModelConfig.from_dict(d.pop("backbone")), **d)

    def replace(self, **changes) -> "SelfDistillConfig":
        return dataclasses.replace(self, **changes)


def self_distill_config(model: str, variant: str, *, image_size: int, head_hidden: int = 2048, head_dim: int = 256,
                        head_layers: int = 3, prototypes: int = 0, norm_last_layer: bool = True,
                        **backbone_overrides) -> SelfDistillConfig:
    backbone = model_config(model, variant, image_size=image_size, num_classes=0, **backbone_overrides)
    return SelfDistillConfig(backbone=backbone, head_hidden=head_hidden, head_dim=head_dim, head_layers=head_layers,
                             prototypes=prototypes, norm_last_layer=norm_last_layer)


def position_table_at(clf: ImageClassifier, grid: int) -> jax.Array:
    """`[1, 1 + grid², d]`: the backbone's position table for a `grid × grid` patch grid."""
    cfg = clf.cfg
    if grid == cfg.grid:
        return clf.position_table()
    if clf.pos_embedding is None:
        return posemb.sincos_2d_with_cls(grid, cfg.width)
    pos = clf.pos_embedding[...]
    patches = pos[0, 1:].reshape(cfg.grid, cfg.grid, cfg.width).astype(jnp.float32)
    if cfg.pos_resize == "dino":
        patches = posemb.resample_dino(patches, grid).astype(pos.dtype)
    else:
        patches = jax.image.resize(patches, (grid, grid, cfg.width), "bicubic").astype(pos.dtype)
    return jnp.concatenate([pos[:, :1], patches.reshape(1, grid * grid, cfg.width)], axis=1)


def embed_any_size(clf: ImageClassifier, images: jax.Array, key=None) -> jax.Array:
    """`ImageClassifier.embed` for square NHWC images of any multiple of the patch size."""
    cfg = clf.cfg
    B, H, W, C = images.shape
    if H != W or H % cfg.patch_size or C != cfg.channels:
        raise ConfigError(f"views of shape {tuple(images.shape)} do not fit the backbone: expected square NHWC "
                          f"images with {cfg.channels} channels and a side divisible by the patch {cfg.patch_size}")
    if H == cfg.image_size:
        return clf.embed(images, key)
    dtype = jnp.dtype(cfg.dtype)
    x = patchify(images.astype(dtype), cfg.patch_size)
    if cfg.model == "crate":
        x = clf.embed_norm(clf.embedding(clf.patch_norm(x.reshape(B, x.shape[1], -1))))
    else:
        x = clf.embedding(x)
    cls = jnp.broadcast_to(clf.cls[...].astype(dtype), (B, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + position_table_at(clf, H // cfg.patch_size).astype(dtype)
    return L.dropout(x, cfg.emb_dropout, key)


def backbone_features(clf: ImageClassifier, images, *, train: bool = False, rng=None) -> jax.Array:
    """Pooled backbone features `[B, d]` (the input of the classifier head) at any resolution."""
    k_emb, k_enc = (None, None) if (rng is None or not train) else tuple(jax.random.split(rng))
    x, _ = clf.encoder(embed_any_size(clf, images, k_emb), key=k_enc)
    return clf.pool(x)


class SelfDistillModel(nnx.Module):
    """`model(views [B, S, S, C]) -> z [B, head_dim]` (unit norm), or DINO's logits `[B, prototypes]`;
    `features(views) -> [B, d]`."""

    def __init__(self, cfg: SelfDistillConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        b = cfg.backbone
        self.backbone = ImageClassifier(b, rngs=rngs)
        self.head = DINOHead(b.width, hidden=cfg.head_hidden, out_dim=cfg.head_dim, layers=cfg.head_layers,
                             dtype=jnp.dtype(b.dtype), param_dtype=jnp.dtype(b.param_dtype), rngs=rngs,
                             prototypes=cfg.prototypes, norm_last_layer=cfg.norm_last_layer)

    def features(self, images, *, train: bool = False, rng=None) -> jax.Array:
        return backbone_features(self.backbone, images, train=train, rng=rng)

    def __call__(self, images, *, train: bool = False, rng=None) -> jax.Array:
        return self.head(self.features(images, train=train, rng=rng))


def build_self_distill(cfg: SelfDistillConfig, seed: int | jax.Array = 0) -> SelfDistillModel:
    """A freshly initialised student (the constructor of bundle kind 'self_distill')."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return SelfDistillModel(cfg, rngs=nnx.Rngs(params=key))


def head_flops(cfg: SelfDistillConfig) -> int:
    d, h, z, n = cfg.backbone.width, cfg.head_hidden, cfg.head_dim, cfg.head_layers
    dims = [d] + [h] * (n - 1) + [z]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * z * cfg.prototypes


def view_forward_flops(cfg: SelfDistillConfig, size: int) -> int:
    """Forward FLOPs of the backbone + head on one view of `size` px."""
    return forward_flops(cfg.backbone.replace(image_size=size)) + head_flops(cfg)
