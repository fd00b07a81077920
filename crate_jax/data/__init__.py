"""Input pipelines, grouped by kind, with the pieces every kind shares at this root. Submodules are imported
explicitly (``from crate_jax.data.images import loader``) so that importing the package stays cheap.

* ``images``: labelled images (classification sources, augmentation, the per-process loaders, DINO
  multi-crop, image files as a bundle takes them, synthetic COCO-format scenes).
* ``image_text``: image-text pairs (CLIPA, docs/clipa.md §Recipes): webdataset and TFDS / ArrayRecord
  iterators, the converter between them, captions, rows, synthetic captioned scenes.
* ``tokens``: token shards for the language models: ``prepare`` (text -> shards) and ``loader`` (windows).

Shared: ``decode`` (bytes -> RGB image, draft decoding), ``crops`` (the one Inception crop and the
resize-small + centre crop), ``batching`` (skip counting and logging, padded batches), ``seeding``;
webdataset shards: ``shard_patterns`` (brace / glob patterns, fsspec), ``tar_reader``, ``tar_writer``,
``shard_stream`` (one process's deterministic sample stream).
"""
