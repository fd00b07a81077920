"""Token data for the language models (docs/language.md).

* ``prepare``: plain-text, JSONL or Parquet files -> token shards with a manifest and a held-out split
  (``python -m crate_jax.data.tokens.prepare``).
* ``loader``: random train windows and ordered eval windows over those shards.
"""
