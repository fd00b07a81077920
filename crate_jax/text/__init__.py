"""Text tokenisation for the text tower (CLIPA BERT WordPiece): ``crate_jax.text.tokenizer``.

Submodules are imported explicitly, so that ``python -m crate_jax.text.tokenizer`` (the vocab
command) runs without the package having imported it first.
"""
