"""White-box analysis: per-layer coding rate, compression and sparsity (docs/math.md §Coding rate), attention maps and
emergent segmentation. The command is `python -m crate_jax.analyze`.

Main entry points (the rate functions live in the module `crate_jax.analysis.coding_rate`):
  `measure_model(model, images) -> list[dict]`: per-layer compression and sparsity over a dataset.
  `compare_with_init(model, images) -> {'trained': rows, 'init': rows}`.
  `load_images(source, image_size) -> ImageSet`: folder / .npy / bundled sample set, resized and normalised.
"""

from crate_jax.analysis import coding_rate  # the module: coding_rate.coding_rate, .compression_rate, ...
from crate_jax.analysis.measure import (attention_and_features, compare_with_init, measure_model,
                                        measure_per_sample, summarize)
from crate_jax.analysis.samples import SAMPLE_SETS, ImageSet, ImageSourceError, load_images
from crate_jax.analysis.segmentation import maskcut, pca_rgb, threshold_attention

__all__ = ["coding_rate", "measure_model", "measure_per_sample", "summarize", "compare_with_init",
           "attention_and_features", "SAMPLE_SETS", "ImageSet", "ImageSourceError", "load_images", "maskcut",
           "pca_rgb", "threshold_attention"]
