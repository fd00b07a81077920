"""Random generators keyed by integers, the only randomness of the image-text and synthetic data.

A sample's shuffle position, crop and caption come from a generator keyed by the seed and by where
the sample sits (epoch, shard, index, ...), so any position can be regenerated on resume.
"""

from __future__ import annotations

import numpy as np


def sample_rng(*parts: int) -> np.random.Generator:
    """Generator keyed by integers (seed, epoch, shard, index, ...): same key, same numbers."""
    return np.random.default_rng([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
