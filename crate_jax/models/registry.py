"""Model kinds: one table from a bundle's `kind` to its config class and constructor.

Every model config class declares its kind as a class attribute (`ModelConfig.kind ==
'classifier'`, `TwoTowerConfig.kind == 'two_tower'`, ...). A bundle's `model.json` stores that kind
next to the config, and `crate_jax.checkpoint.bundle` rebuilds the model through this table, so the
checkpoint code never needs to know the model families. A new family adds one line here, saying also
what its inputs are (`inputs`: 'image', 'tokens' or 'image+text'), where its image-side config lives (for
the resolution and channels a bundle's preprocessing records), how its dtype changes, and, for models
with a detachable backbone, how to take it out. Commands ask these, never the config classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from crate_jax.models.bert import BertConfig, build_bert
from crate_jax.models.classifier import build_model
from crate_jax.models.config import ConfigError, ModelConfig
from crate_jax.models.lm import LMConfig, build_lm
from crate_jax.models.mae import MAEConfig, build_mae
from crate_jax.models.self_distill import SelfDistillConfig, build_self_distill
from crate_jax.models.two_tower import TwoTowerConfig, build_two_tower


@dataclasses.dataclass(frozen=True)
class Kind:
    config_cls: type
    build: Callable[[Any, int | jax.Array], nnx.Module]
    inputs: str  # 'image', 'tokens' or 'image+text'
    image: Callable[[Any], Any] = lambda cfg: None  # the config holding image_size / patch_size / channels
    backbone: Callable[[Any, dict], tuple[Any, dict]] | None = None  # (cfg, params) -> the backbone's

    def config_from_dict(self, d: dict) -> Any:
        return self.config_cls.from_dict(d)


def _nested_dtype(*fields: str):
    def cast(cfg, dtype):
        return cfg.replace(**{f: getattr(cfg, f).replace(param_dtype=dtype, dtype=dtype) for f in fields})
    return cast


KINDS: dict[str, Kind] = {
    ModelConfig.kind: Kind(ModelConfig, build_model, "image", image=lambda c: c),
    TwoTowerConfig.kind: Kind(TwoTowerConfig, build_two_tower, "image+text", image=lambda c: c.image),
    LMConfig.kind: Kind(LMConfig, build_lm, "tokens"),
    BertConfig.kind: Kind(BertConfig, build_bert, "tokens"),
    MAEConfig.kind: Kind(MAEConfig, build_mae, "image", image=lambda c: c),
    SelfDistillConfig.kind: Kind(SelfDistillConfig, build_self_distill, "image", image=lambda c: c.backbone,
                                 backbone=lambda c, p: (c.backbone, p["backbone"])),
}
_DTYPE = {TwoTowerConfig.kind: _nested_dtype("image", "text"), SelfDistillConfig.kind: _nested_dtype("backbone")}


def kind_of(cfg) -> str:
    """The bundle kind a model config declares (`cfg.kind`)."""
    kind = getattr(type(cfg), "kind", None)
    if kind not in KINDS:
        raise ConfigError(f"{type(cfg).__name__} declares no known model kind (got {kind!r}); known kinds: "
                          f"{sorted(KINDS)}")
    return kind


def lookup(kind: str) -> Kind:
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {sorted(KINDS)}")
    return KINDS[kind]


def config_from_dict(kind: str, d: dict) -> Any:
    return lookup(kind).config_from_dict(d)


def build(cfg, seed: int | jax.Array = 0) -> nnx.Module:
    """A freshly initialised model for any registered config."""
    return lookup(kind_of(cfg)).build(cfg, seed)


def abstract(cfg) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: build(cfg, 0))


def inputs_of(cfg) -> str:
    """What the model takes: 'image', 'tokens' or 'image+text'."""
    return lookup(kind_of(cfg)).inputs


def image_config(cfg):
    """The config with the image side's `image_size`, `patch_size` and `channels` (None for text models)."""
    return lookup(kind_of(cfg)).image(cfg)


def with_dtype(cfg, dtype: str):
    """`cfg` computing and storing its parameters in `dtype` (every tower of a multi-part model)."""
    kind = kind_of(cfg)
    return _DTYPE[kind](cfg, dtype) if kind in _DTYPE else cfg.replace(param_dtype=dtype, dtype=dtype)


def backbone(cfg, params: dict) -> tuple[Any, dict]:
    """`(backbone cfg, backbone params)` of a model with a detachable backbone (a SimDINO student / teacher)."""
    kind = kind_of(cfg)
    if lookup(kind).backbone is None:
        raise ConfigError(f"a {kind!r} model has no separate backbone; only "
                          f"{sorted(k for k, v in KINDS.items() if v.backbone)} models do")
    return lookup(kind).backbone(cfg, params)
