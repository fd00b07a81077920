"""Image-text pairs (CLIPA, docs/clipa.md §Recipes).

* ``shard_train`` / ``shard_eval``: the webdataset iterators; ``tfds_captions``: the same iterators over a
  TFDS / ArrayRecord directory, which ``arrayrecord_convert`` writes from shards.
* ``rows``: what one sample becomes (train / eval row, padded eval batch); ``captions``.
* ``synth_scenes``: synthetic captioned scenes with a held-out zero-shot task.

The shard plumbing they read through (patterns, tar reader / writer, sample stream) is at ``crate_jax.data``.
"""
