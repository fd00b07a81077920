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
    n = tokens.shape[0]
    bs = max(1, min(batch_size, n))
    outs = []
    for start in range(0, n, bs):
        x = np.asarray(tokens[start:start + bs], np.int32)
        real = x.shape[0]
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], np.int32)])
        outs.append(np.asarray(fwd(state, x))[:real])
    return np.concatenate(outs)


def load_lm(path: str | os.PathLike, step: int | None = None) -> tuple[LMConfig, LanguageModel]:
    """`(cfg, model)` from a language-model bundle, or a training workdir (its newest committed
    checkpoint, or `step`; only the parameters are read)."""
    from crate_jax.checkpoint.bundle import MODEL_JSON, PARAMS_DIR, BundleError, load_bundle, load_config
    from crate_jax.checkpoint.params import ParamsError, read_params
    path = Path(path)
    if (path / MODEL_JSON).is_file() and (path / PARAMS_DIR).is_dir():
        cfg, model = load_bundle(path)
    elif (path / MODEL_JSON).is_file() and (path / "checkpoints").is_dir():
        cfg = load_config(path)
        if not isinstance(cfg, LMConfig):
            raise BundleError(f"{path} holds a {type(cfg).__name__}, not a language model (bundle kind 'lm')")
        try:
            params = read_params(path, step)
        except ParamsError as e:
            raise BundleError(str(e)) from e
        model = model_from_params(cfg, params)
    else:
        raise BundleError(f"{path} is neither a bundle ({MODEL_JSON} + {PARAMS_DIR}/) nor a training workdir "
                          f"({MODEL_JSON} + checkpoints/)")
    if not isinstance(cfg, LMConfig):
        raise BundleError(f"{path} holds a {type(cfg).__name__}, not a language model (bundle kind 'lm')")
    return cfg, model


def model_from_params(cfg: LMConfig, params: dict) -> LanguageModel:
    """A model of `cfg` holding `params` (nested dict); no random init runs."""
    from crate_jax.models.lm import build_lm
    abstract = nnx.eval_shape(lambda: build_lm(cfg, 0))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def find_tokenizer(checkpoint: str | os.PathLike, explicit: str | None = None) -> Path:
    """The tokenizer of a checkpoint: `explicit`, else `CHECKPOINT/tokenizer.json`, else the one in the training
    data directory named by `CHECKPOINT/config.json` (`data.dir`)."""
    import json
    if explicit:
        return Path(explicit)
    ck = Path(checkpoint)
    if (ck / "tokenizer.json").is_file():
        return ck / "tokenizer.json"
    cfg_path = ck / "config.json"
    if cfg_path.is_file():
        try:
            data_dir = (json.loads(cfg_path.read_text()).get("data") or {}).get("dir")
        except ValueError:
            data_dir = None
        if data_dir:
            from crate_jax.data.text_tokens import TokenDataError, TokenDataset
            try:
                return TokenDataset(data_dir).tokenizer_path
            except TokenDataError:
                pass
    raise TokenInputError(f"{checkpoint}: no tokenizer found (no tokenizer.json in the checkpoint, and no readable "
                          f"data.dir in its config.json); pass --tokenizer PATH")
