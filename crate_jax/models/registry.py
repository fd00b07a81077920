"""Model kinds: one table from a bundle's `kind` to its config class and constructor.

Every model config class declares its kind as a class attribute (`ModelConfig.kind ==
'classifier'`, `TwoTowerConfig.kind == 'two_tower'`, ...). A bundle's `model.json` stores that kind
next to the config, and `crate_jax.checkpoint.bundle` rebuilds the model through this table, so the
checkpoint code never needs to know the model families. A new family adds one line here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

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

    def config_from_dict(self, d: dict) -> Any:
        return self.config_cls.from_dict(d)


KINDS: dict[str, Kind] = {
    ModelConfig.kind: Kind(ModelConfig, build_model),
    TwoTowerConfig.kind: Kind(TwoTowerConfig, build_two_tower),
    LMConfig.kind: Kind(LMConfig, build_lm),
    MAEConfig.kind: Kind(MAEConfig, build_mae),
    SelfDistillConfig.kind: Kind(SelfDistillConfig, build_self_distill),
}


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
