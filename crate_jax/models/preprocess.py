"""On-device input normalisation: uint8 pixels -> the float inputs the image models take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images) -> jax.Array:
    """uint8 `[B, H, W, 3]` in [0, 255] -> ImageNet-normalised float32 (big_vision `vgg_value_range`)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD
