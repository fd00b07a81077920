"""Running a masked-LM encoder bundle (`crate_jax.models.bert`) on token arrays: `predict --tokens` for kind 'bert'.

    python -m crate_jax.predict --checkpoint bundles/crate_bert --tokens ids.npy [--attention-mask m.npy]
        [--token-types tt.npy] --output logits.npy

`--tokens` int `[B, T]` (ids below the vocabulary, `T` at most the position table's limit), `--attention-mask`
`[B, T]` of 0 / 1 (1 = token, 0 = padding; default all ones, as the pull request's model), `--token-types`
int `[B, T]` (default 0). The output is float32 MLM logits `[B, T, V]`, or `[B, num_labels]` for a
fine-tuned classifier bundle; nothing is written unless every value is finite.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.checkpoint.files import read_npy
from crate_jax.models.batch_apply import apply_in_batches
from crate_jax.models.bert import BertConfig


class MLMInputError(ValueError):
    """Token, mask or token-type arrays that do not fit the encoder; the message says what was expected."""


def _read(path, what: str, flag: str) -> np.ndarray:
    return np.asarray(read_npy(path, what, flag, MLMInputError))


def check_inputs(cfg: BertConfig, tokens, mask=None, types=None, *, source: str = "tokens"):
    """`(tokens, mask, types)` as int32 `[B, T]`, each checked against `cfg` (defaults: mask 1, types 0)."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim != 2 or 0 in tokens.shape:
        raise MLMInputError(f"{source}: expected a 2-D integer array of token ids [B, T], got {tokens.dtype} "
                            f"{tokens.shape}")
    if tokens.shape[1] > cfg.max_tokens:
        raise MLMInputError(f"{source}: sequences of {tokens.shape[1]} tokens exceed this encoder's limit of "
                            f"{cfg.max_tokens} ({cfg.max_positions} position rows"
                            + (f", RoBERTa positions start at pad id {cfg.pad_token_id} + 1" if cfg.positions ==
                               "roberta" else "") + f"); cut them to at most {cfg.max_tokens}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise MLMInputError(f"{source}: token ids span [{lo}, {hi}], outside the vocabulary [0, {cfg.vocab_size})")
    out = [tokens.astype(np.int32)]
    for arr, name, limit, default in ((mask, "attention mask", 2, 1), (types, "token types", cfg.type_vocab_size, 0)):
        if arr is None:
            out.append(np.full(tokens.shape, default, np.int32))
            continue
        arr = np.asarray(arr)
        if arr.shape != tokens.shape:
            raise MLMInputError(f"{name}: shape {arr.shape} differs from the tokens' {tokens.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise MLMInputError(f"{name}: dtype {arr.dtype}; expected integers (or bool)")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
            raise MLMInputError(f"{name}: values span [{int(arr.min())}, {int(arr.max())}], expected [0, {limit})"
                                + (" (1 = token, 0 = padding)" if limit == 2 else ""))
        out.append(arr.astype(np.int32))
    return tuple(out)


def encoder_outputs(model, tokens, mask, types, *, batch_size: int = 8) -> np.ndarray:
    """float32 model outputs (MLM logits `[B, T, V]` or class logits `[B, labels]`), jitted once per shape."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda t, m, y: nnx.merge(graphdef, state)(t, m, y).astype(jnp.float32))
    return apply_in_batches(fn, (tokens, mask, types), batch_size)


def predict_main(args, cfg: BertConfig, model) -> int:
    """`predict --tokens` on a 'bert' bundle (the module docstring); errors raise `MLMInputError`."""
    import sys
    from crate_jax.predict_io import PredictError, save_finite
    try:
        if args.text is not None or args.images is not None:
            raise MLMInputError("a masked-LM encoder takes --tokens ids.npy (with --attention-mask / --token-types)")
        if not (cfg.mlm_head or cfg.num_labels):
            raise MLMInputError(f"{args.checkpoint} is a bare encoder (no MLM head, no classifier): it has no logits "
                                f"to write")
        tokens, mask, types = check_inputs(cfg, *read_inputs(args.tokens, args.attention_mask, args.token_types),
                                           source=str(args.tokens))
        out = encoder_outputs(model, tokens, mask, types, batch_size=args.batch_size)
        save_finite(args.output, out, "logits")
    except (MLMInputError, PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "MLM logits" if not cfg.num_labels else "class logits"
    print(f"{cfg.model} {cfg.variant}: {what} {list(out.shape)} -> {args.output}")
    return 0


def read_inputs(tokens: str | os.PathLike, mask=None, types=None):
    """The arrays of `--tokens` / `--attention-mask` / `--token-types` (memory-mapped, unchecked)."""
    return (_read(tokens, "int tokens [B, T]", "tokens"),
            None if mask is None else _read(mask, "0/1 mask [B, T]", "attention-mask"),
            None if types is None else _read(types, "int token types [B, T]", "token-types"))
