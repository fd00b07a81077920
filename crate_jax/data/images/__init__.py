"""Image data (docs/vision.md): labelled images and what the image models read.

* ``classification``: classification sources (digits, MNIST, TFDS / ArrayRecord, image folders),
  ``default_data_config()``.
* ``augment``: the train recipe (Inception crop, flip, RandAugment) and the eval recipe.
* ``loader``: per-process classification iterators (train / eval), plus the generic decode -> augment ->
  skip-bad -> batch machinery other pipelines reuse.
* ``multicrop``: DINO multi-crop views (SimDINO).
* ``image_files``: image files decoded and preprocessed as a bundle's model takes them (``predict``).
* ``coco_scenes``: synthetic multi-object scenes in COCO format, for segmentation scoring.
"""
