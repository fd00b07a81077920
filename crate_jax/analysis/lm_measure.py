"""Per-layer compression and sparsity of a language model over token sequences (docs/math.md §Coding rate, on text).

`measure_lm(model, tokens [M, T])` returns the rows of `crate_jax.analysis.measure.summarize`, one per
layer, with the same keys and definitions as for images (see `crate_jax.analysis.measure`), the
"tokens" of a sample being its `T` token positions instead of its patches:

* `compression`: the official measurement `½ Σ_k logdet(I_T + p/(T·ε²) X̂_k X̂_kᵀ)` on the MSSA
  projections `X = LN1(Z^ℓ) U^ℓ` with unit-norm rows (CRATE-GPT, CRATE-α LM; `None` for GPT-2, which has
  no subspaces), mean and unbiased std over sequences.
* `sparsity`: the fraction of non-zero entries of the layer's code: CRATE-GPT's ISTA output `Z^{ℓ+1}`
  `[T, d]`, the CRATE-α ODL code `[T, 4d]`, GPT-2's MLP hidden activation `[T, 4d]` (GELU: essentially
  never zero).
* `paper_compression`, `paper_coding_rate`: the paper forms on the raw layer inputs `Z^ℓ`.

Causal attention does not change the definitions: they measure the token representations, not the
attention pattern.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.analysis.measure import (OFFICIAL_EPS_SQ, PAPER_EPS, _committed, _jitted, check_layers,
                                        layer_inputs, rates_from_captures, summarize)


def lm_has_subspaces(model) -> bool:
    return model.cfg.model in ("crate_gpt", "crate_alpha", "crate_bert")


def lm_forward_captures(model, tokens: jax.Array) -> dict[str, jax.Array]:
    """One forward pass with captures: `zero_count int32 [depth, B]`, `z_in [depth, B, T, d]`, and for the
    white-box models `mssa_w [depth, B, T, K, p]`."""
    _, caps = model(tokens, capture=True)
    out = {"zero_count": jnp.sum(caps["code"] == 0, axis=(2, 3), dtype=jnp.int32), "z_in": layer_inputs(caps)}
    if "mssa_w" in caps:
        out["mssa_w"] = caps["mssa_w"]
    return out


def measure_lm_per_sample(model, tokens, *, batch_size: int = 8, paper_eps: float = PAPER_EPS,
                          official_eps_sq: float = OFFICIAL_EPS_SQ, precision: str = "float64",
                          progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Per-sequence values `[depth, M]` (float64) over `tokens int [M, T]` (see the module docstring)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens of shape {tokens.shape}: expected [M, T] with M >= 1")
    m, T = tokens.shape
    forward = _jitted(model, lm_forward_captures)
    U = _committed(model.encoder.blocks.mssa.proj.kernel[...]) if lm_has_subspaces(model) else None
    chunks: dict[str, list[np.ndarray]] = {}
    bs = max(1, min(batch_size, m))
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, m, bs)):
        batch = tokens[start:start + bs]
        keep = batch.shape[0]
        if keep < bs:
            batch = np.concatenate([batch, np.zeros((bs - keep, T), np.int32)])
        cap = forward(jnp.asarray(batch))
        res = {"zero_count": np.asarray(cap.pop("zero_count"))}
        res.update(rates_from_captures(cap, U, paper_eps=float(paper_eps), official_eps_sq=float(official_eps_sq),
                                       precision=precision))
        for k, v in res.items():
            chunks.setdefault(k, []).append(np.asarray(v)[:, :keep])
        if progress is not None:
            progress(f"measured batch {i + 1}/{math.ceil(m / bs)} ({start + keep}/{m} sequences, "
                     f"{time.perf_counter() - t0:.1f} s)")
    per = {k: np.concatenate(v, axis=1) for k, v in chunks.items()}
    cfg = model.cfg
    code_size = T * (cfg.dict_size if cfg.model != "gpt2" else cfg.block.mlp_dim)
    zeros = per.pop("zero_count").astype(np.float64)
    per["zero_fraction"] = zeros / code_size
    per["nonzero_fraction"] = (code_size - zeros) / code_size
    return {k: v.astype(np.float64) for k, v in per.items()}


def measure_lm(model, tokens, *, layers: Sequence[int] | None = None, **kwargs) -> list[dict]:
    """Per-layer rows (the keys of `crate_jax.analysis.measure`) of a language model over `tokens [M, T]`."""
    layers = check_layers(layers, model.cfg.depth)
    return summarize(measure_lm_per_sample(model, tokens, **kwargs), layers)
