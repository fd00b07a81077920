"""Every network of the family (Flax NNX): CRATE, CRATE-α and ViT image classifiers, text towers,
the CLIPA two-tower model; their blocks, layers, configs and the registry of model kinds. See
docs/math.md for the math."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from crate_jax.models.classifier import ImageClassifier, build_model, patchify
from crate_jax.models.config import (VARIANTS, BlockConfig, ConfigError, ModelConfig, model_config,
                                     parse_variant)


def abstract_model(cfg) -> nnx.Module:
    """The model of any registered config with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
    from crate_jax.models import registry
    return registry.abstract(cfg)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


__all__ = ["ImageClassifier", "ModelConfig", "BlockConfig", "ConfigError", "model_config", "parse_variant",
           "VARIANTS", "build_model", "abstract_model", "count_params", "patchify"]
