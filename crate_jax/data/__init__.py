"""Input pipelines. Submodules are imported explicitly (``from crate_jax.data import loader``) so that
importing the package stays cheap.

Classification:

* ``loader``: per-process classification iterators (train / eval), plus the generic decode ->
  augment -> skip-bad -> batch machinery other pipelines reuse.
* ``classification``: classification sources (digits, TFDS, image folders), ``default_data_config()``.
* ``augment``: the train recipe (Inception crop, flip, RandAugment) and the eval recipe.

Image-text (CLIPA, docs/clipa.md §Recipes):

* ``shard_patterns`` (brace / glob patterns, fsspec), ``tar_reader``, ``tar_writer``: webdataset shards.
* ``shard_stream``: one process's deterministic sample stream; ``shard_train`` / ``shard_eval``: the
  webdataset iterators; ``tfds_captions``: the same iterators over a TFDS / ArrayRecord directory,
  which ``arrayrecord_convert`` writes from shards.
* ``image_text_rows``: what one sample becomes (train / eval row, padded eval batch); ``captions``.
* ``synth_scenes``: synthetic captioned scenes with a held-out zero-shot task.

Shared: ``decode`` (bytes -> RGB image, draft decoding), ``crops`` (the one Inception crop and the
resize-small + centre crop), ``batching`` (skip counting and logging, padded batches), ``seeding``.
"""
