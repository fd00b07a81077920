"""Per-layer compression and sparsity of a CRATE-BERT / BERT encoder over token rows, padding excluded
(`analyze --tokens` on a bundle of kind 'bert').

The definitions are the language models' (`crate_jax.analysis.lm_measure`: the MSSA-subspace compression of
CRATE-BERT's `qkv` projections, the fraction of non-zero entries of the ISTA code, the paper forms on the layer
inputs). A row's `<pad>` tokens must come after its text (right padding): the row is measured on its text
alone, cut to its length, which gives its tokens exactly the representations the padded, masked row gives them
(padding is masked out of the keys and does not move RoBERTa's positions), and keeps padding out of every
statistic. Rows of equal length are measured together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crate_jax.analysis.lm_measure import measure_lm_per_sample
from crate_jax.analysis.measure import check_layers, summarize
from crate_jax.models.bert import BertConfig


def check_rows(tokens, cfg: BertConfig, source="tokens") -> np.ndarray:
    """int32 `[M, T]` token rows checked against `cfg`, each right-padded with `cfg.pad_token_id`."""
    from crate_jax.mlm.inference import check_inputs
    tokens = check_inputs(cfg, np.asarray(tokens), source=str(source))[0]
    real = tokens != cfg.pad_token_id
    bad = np.flatnonzero(~real[:, 0] | np.any(np.diff(real.astype(np.int8), axis=1) > 0, axis=1))
    if bad.size:
        raise ValueError(f"{source}: rows {bad[:10].tolist()} start with padding or have padding (id "
                         f"{cfg.pad_token_id}) before text; give right-padded rows")
    return tokens


def measure_bert(model, tokens, *, layers: Sequence[int] | None = None, **kwargs) -> list[dict]:
    """Per-layer rows (the keys of `crate_jax.analysis.measure`) over right-padded `tokens [M, T]`, padding excluded."""
    layers = check_layers(layers, model.cfg.depth)
    tokens = np.asarray(tokens, np.int32)
    lengths = np.sum(tokens != model.cfg.pad_token_id, axis=1)
    per: dict[str, np.ndarray] = {}
    for n in np.unique(lengths):
        rows = np.flatnonzero(lengths == n)
        part = measure_lm_per_sample(model, tokens[rows, :n], **kwargs)
        for k, v in part.items():
            per.setdefault(k, np.zeros((v.shape[0], len(tokens)), np.float64))[:, rows] = v
    return summarize(per, layers)
