"""Running a language-model bundle on token arrays: checked token files and batched, jitted logits.

Used by `python -m crate_jax.predict --tokens`, `crate_jax.analyze --tokens` and `crate_jax.generate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.checkpoint.files import read_npy
from crate_jax.models.batch_apply import apply_in_batches
from crate_jax.models.lm import LanguageModel, LMConfig


class TokenInputError(ValueError):
    """A token array that does not fit the model; the message says what was expected."""


def read_token_array(path: str | os.PathLike) -> np.ndarray:
    """`--tokens`: a `.npy` array (memory-mapped) of int tokens, TokenInputError naming the file otherwise."""
    return read_npy(path, "int tokens [B, T]", "tokens", TokenInputError)


def check_tokens(tokens: np.ndarray, cfg: LMConfig, source="tokens", *, windows: bool = False) -> np.ndarray:
    """`int32 [B, T]` tokens checked against `cfg`: integer dtype, ids in `[0, vocab_size)`, `T <= block_size`.

    With `windows`, a 1-D token stream is cut into `[B, block_size]` rows (the tail dropped)."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TokenInputError(f"{source}: dtype {tokens.dtype}; expected integer token ids")
    if tokens.ndim == 1 and windows:
        n = tokens.shape[0] // cfg.block_size
        if n == 0:
            raise TokenInputError(f"{source}: {tokens.shape[0]} tokens, fewer than one block of {cfg.block_size}")
        tokens = tokens[: n * cfg.block_size].reshape(n, cfg.block_size)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TokenInputError(f"{source}: expected a 2-D array of token ids [B, T], got shape {tokens.shape}")
    if tokens.shape[1] > cfg.block_size:
        raise TokenInputError(f"{source}: sequences of {tokens.shape[1]} tokens exceed the model's block size "
                              f"{cfg.block_size}; cut them to at most {cfg.block_size}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise TokenInputError(f"{source}: token ids span [{lo}, {hi}], outside the vocabulary [0, {cfg.vocab_size}) "
                              f"of this model (tokenised with another tokenizer?)")
    return tokens.astype(np.int32)


def lm_logits(model: LanguageModel, tokens: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """float32 logits `[B, T, vocab_size]` of checked `tokens [B, T]`. The forward is jitted once: the last
    batch is padded to the batch size."""
    if batch_size < 1:
        raise TokenInputError(f"batch size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    V = model.cfg.vocab_size
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[..., :V].astype(jnp.float32))
    return apply_in_batches(lambda t: fwd(state, t), tokens, batch_size, dtypes=[np.int32])


def find_tokenizer(checkpoint: str | os.PathLike, explicit: str | None = None) -> Path:
    """The tokenizer of a checkpoint: `explicit`, else the bundle's (`tokenizer.json`), else the one in the training
    data directory named by `CHECKPOINT/config.json` (`data.dir`)."""
    import json
    if explicit:
        return Path(explicit)
    ck = Path(checkpoint)
    from crate_jax.checkpoint.models import tokenizer_path
    if tokenizer_path(ck) is not None:  # the bundle's own (preprocess.json names it)
        return tokenizer_path(ck)
    cfg_path = ck / "config.json"
    if cfg_path.is_file():
        try:
            data_dir = (json.loads(cfg_path.read_text()).get("data") or {}).get("dir")
        except ValueError:
            data_dir = None
        if data_dir:
            from crate_jax.data.tokens.loader import TokenDataError, TokenDataset
            try:
                return TokenDataset(data_dir).tokenizer_path
            except TokenDataError:
                pass
    raise TokenInputError(f"{checkpoint}: no tokenizer found (no tokenizer.json in the checkpoint, and no readable "
                          f"data.dir in its config.json); pass --tokenizer PATH")
