"""Per-layer compression and sparsity of a model over a dataset (docs/math.md §Coding rate), jitted and batched.

`measure_model(model, images)` returns one dict per layer. The keys, for layer ℓ (0-based) of a model
with tokens `Z^ℓ [N+1, d]` entering layer ℓ (cls token included):

Official measurement form (CRATE `vis_utils`, the curves of the papers' layer-wise figures):

* `compression`, `compression_std`: mean and **unbiased** std over samples of
  `R_b = ½ Σ_k logdet(I_N + p/(N·eps_sq) X̂_k X̂_kᵀ)`, `X̂` the MSSA projections `LN1(Z^ℓ) U^ℓ`
  (the attention block's *input* side) with every token's p-vector scaled to unit norm, `eps_sq = 0.01`.
* `sparsity`, `sparsity_std`: mean and population std over samples of the fraction of **non-zero**
  entries of the layer's sparse code (lower = sparser; this is what the official plot draws).
  CRATE: the ISTA output `Z^{ℓ+1}` `[N+1, d]`; CRATE-α: the ODL code after the unrolled ISTA steps
  `[N+1, 4d]`; ViT: the MLP hidden activation (GELU, essentially never exactly zero).
* `zero_fraction`, `zero_fraction_std`: the official code's own number, `1 − sparsity`.

Paper form (the definitions, with the layer's own subspaces):

* `paper_compression(_std)`: `R^c(Z^ℓ; U^ℓ_[K]) = Σ_k ½ logdet(I_p + p/(Nε²) (Z^ℓU^ℓ_k)ᵀ(Z^ℓU^ℓ_k))` on the
  raw layer input `Z^ℓ` (no LayerNorm, no normalisation), ε = `paper_eps` (default 0.5).
* `paper_coding_rate(_std)`: `R(Z^ℓ; ε) = ½ logdet(I_d + d/(Nε²) Z^ℓᵀZ^ℓ)`, same tokens and ε.
* `paper_sparsity(_std)`: `‖code^ℓ‖₀ / size`, the same quantity as `sparsity` (both forms define it alike).

Rates use unbiased stds, fractions population stds; a std over one sample is `None`. ViT has no
subspaces, so its compression keys are `None`.

Computation: a jitted forward pass with captures (stage 1, `forward_captures`, the model's dtype) feeds
jitted rate functions (stage 2, `rates_from_captures`) that by default run in float64 (`jax.enable_x64`),
because float32 Cholesky factors of ill-conditioned `I + a G` lose the small pivots (see `coding_rate`).
Datasets go through in padded batches of a fixed size, so each function compiles once per architecture.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.analysis import coding_rate as cr

PAPER_EPS = 0.5
OFFICIAL_EPS_SQ = 0.01
# the per-sample rates; their std over samples is the unbiased one (torch's default, as the official code)
RATE_KEYS = ("compression", "paper_compression", "paper_coding_rate")


def has_subspaces(model) -> bool:
    """True for CRATE and CRATE-α (MSSA with subspaces `U^ℓ`), False for the ViT baseline."""
    return model.cfg.model in ("crate", "crate_alpha")


def subspaces(model) -> jax.Array:
    """The MSSA subspaces of every layer, `[depth, d, K, p]` (`U^ℓ_k = U[ℓ, :, k, :]`)."""
    if not has_subspaces(model):
        raise ValueError(f"a {model.cfg.model} model has no MSSA subspaces U_k; compression needs CRATE or CRATE-α")
    return model.encoder.blocks.mssa.proj.kernel[...]


def layer_inputs(caps: dict) -> jax.Array:
    """`Z^ℓ` for every layer from a capture dict: `[depth, B, N+1, d]` (layer 0 gets the encoder input)."""
    return jnp.concatenate([caps["tokens_in"][None].astype(caps["out"].dtype), caps["out"][:-1]], axis=0)


def forward_captures(model, images: jax.Array) -> dict[str, jax.Array]:
    """Stage 1 (model dtype, traceable): one forward pass with captures.

    Returns `zero_count` `int32 [depth, B]` (exact zeros of each layer's code per sample), `z_in`
    `[depth, B, N+1, d]` (the layer inputs `Z^ℓ`), and for CRATE / CRATE-α `mssa_w` `[depth, B, N+1, K, p]`.
    """
    _, caps = model(images, capture=True)
    out = {"zero_count": jnp.sum(caps["code"] == 0, axis=(2, 3), dtype=jnp.int32), "z_in": layer_inputs(caps)}
    if "mssa_w" in caps:
        out["mssa_w"] = caps["mssa_w"]
    return out


# One jitted computation per rate, each with exactly one Cholesky. On CPU, jaxlib's batched LAPACK kernels
# block an XLA pool thread while they farm the batch out to the same pool; two of them running at once in
# one executable deadlocked a 2-core machine (observed with jax 0.10.2). Separate, blocking calls avoid it.
@functools.partial(jax.jit, static_argnames=("eps", "dtype"))
def _paper_coding_rate(z, *, eps, dtype):
    return cr.coding_rate(z.astype(dtype), eps)


@functools.partial(jax.jit, static_argnames=("eps", "dtype"))
def _paper_compression(z, U, *, eps, dtype):
    W = jnp.einsum("lbnd,ldkp->lbknp", z.astype(dtype), U.astype(dtype), precision=cr.HIGHEST)
    return cr.compression_from_projections(W, eps)


@functools.partial(jax.jit, static_argnames=("eps_sq", "dtype"))
def _official_compression(w, *, eps_sq, dtype):
    return cr.official_compression(w.astype(dtype), eps_sq)


def _float64_device():
    """Where float64 rates run: the default device, or the host CPU on backends without float64 (TPU)."""
    return None if jax.default_backend() in ("cpu", "gpu", "cuda", "rocm") else jax.devices("cpu")[0]


def rates_from_captures(cap: dict[str, jax.Array], U: jax.Array | None, *, paper_eps: float = PAPER_EPS,
                        official_eps_sq: float = OFFICIAL_EPS_SQ, precision: str = "float64") -> dict[str, np.ndarray]:
    """Stage 2: the rates of every layer and sample, `np.ndarray [depth, B]` each.

    Args:
      cap: `forward_captures` output (`z_in [depth, B, N+1, d]`, optionally `mssa_w [depth, B, N+1, K, p]`).
      U: the subspaces `[depth, d, K, p]`, or None (ViT).
      precision: 'float64' (Gram matrices and Cholesky factors in float64 under `jax.enable_x64`, on the host
        CPU where the backend has no float64) or 'float32' (on device).
    Returns:
      `paper_coding_rate`, and with `U` and `mssa_w` also `compression` (official form) and `paper_compression`.
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    jax.block_until_ready(cap)  # nothing else runs on the thread pool while the LAPACK kernels do

    def run():
        dtype = jnp.float64 if precision == "float64" else jnp.float32
        c, u = cap, U
        device = _float64_device() if precision == "float64" else None
        if device is not None:
            c, u = jax.device_put((c, u), device)
        out = {"paper_coding_rate": jax.device_get(_paper_coding_rate(c["z_in"], eps=paper_eps, dtype=dtype))}
        if u is not None and "mssa_w" in c:
            out["compression"] = jax.device_get(_official_compression(c["mssa_w"], eps_sq=official_eps_sq,
                                                                      dtype=dtype))
            out["paper_compression"] = jax.device_get(_paper_compression(c["z_in"], u, eps=paper_eps, dtype=dtype))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    if precision == "float64":
        with jax.enable_x64(True):
            return run()
    return run()


def _committed(tree):
    """Commits single-device arrays to their device. A restored bundle is committed, a freshly built model is
    not, and jit would otherwise compile the same computation once for each."""
    return jax.tree.map(lambda a: jax.device_put(a, next(iter(a.devices())))
                        if isinstance(a, jax.Array) and len(a.devices()) == 1 else a, tree)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, fn: Callable, frozen_kw: tuple):
    kw = dict(frozen_kw)
    return jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x, **kw))


def _jitted(model, fn: Callable, **kw):
    """`images -> fn(model, images, **kw)`, jitted once per model graph (architecture) and keyword set, so
    a trained model and its initialisation, or repeated calls, share the compiled function."""
    graphdef, state = nnx.split(model)
    run = _compiled(graphdef, fn, tuple(sorted(kw.items())))
    state = _committed(state)
    return lambda x: run(state, x)


def iterate_batches(images: np.ndarray, batch_size: int):
    """Yields `(start, batch)` with every batch padded (zeros) to `min(batch_size, M)` rows, so one compile serves."""
    m = images.shape[0]
    bs = max(1, min(batch_size, m))
    for start in range(0, m, bs):
        batch = np.asarray(images[start:start + bs], np.float32)
        if batch.shape[0] < bs:
            pad = np.zeros((bs - batch.shape[0],) + batch.shape[1:], np.float32)
            batch = np.concatenate([batch, pad])
        yield start, batch


def measure_per_sample(model, images, *, batch_size: int = 16, paper_eps: float = PAPER_EPS,
                       official_eps_sq: float = OFFICIAL_EPS_SQ, precision: str = "float64",
                       progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Per-sample values over a dataset, each `np.ndarray [depth, M]` (float64).

    Args:
      model: an `ImageClassifier` (CRATE, CRATE-α or ViT).
      images: `float32 [M, S, S, 3]`, normalised (see `samples.normalize`), `S = model.cfg.image_size`.
      precision: dtype of the rate computation. 'float64' (default): the forward pass runs in the model's
        dtype, the Gram matrices and Cholesky factors in float64 (under `jax.enable_x64`, on the host CPU
        where the backend has no float64). 'float32': all on device in float32 (faster, but see the
        precision note in `coding_rate`).
    Returns:
      `zero_fraction`, `nonzero_fraction`, `paper_coding_rate`, and for CRATE / CRATE-α `compression`,
      `paper_compression`.
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    images = np.asarray(images)
    cfg = model.cfg
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
        raise ValueError(f"images of shape {images.shape} do not fit the model; expected normalised NHWC "
                         f"[M, {cfg.image_size}, {cfg.image_size}, {cfg.channels}]")
    m = images.shape[0]
    if m == 0:
        raise ValueError("no images to measure")
    forward = _jitted(model, forward_captures)
    U = _committed(subspaces(model)) if has_subspaces(model) else None
    chunks: dict[str, list[np.ndarray]] = {}
    n_batches = math.ceil(m / max(1, min(batch_size, m)))
    t0 = time.perf_counter()
    for i, (start, batch) in enumerate(iterate_batches(images, batch_size)):
        cap = forward(jnp.asarray(batch))
        res = {"zero_count": np.asarray(cap.pop("zero_count"))}
        res.update(rates_from_captures(cap, U, paper_eps=float(paper_eps), official_eps_sq=float(official_eps_sq),
                                       precision=precision))
        keep = min(batch.shape[0], m - start)
        for k, v in res.items():
            chunks.setdefault(k, []).append(np.asarray(v)[:, :keep])
        if progress is not None:
            progress(f"measured batch {i + 1}/{n_batches} ({start + keep}/{m} images, "
                     f"{time.perf_counter() - t0:.1f} s)")
    per = {k: np.concatenate(v, axis=1) for k, v in chunks.items()}
    code_size = (cfg.num_patches + 1) * cfg.dict_size
    zeros = per.pop("zero_count").astype(np.float64)
    per["zero_fraction"] = zeros / code_size
    per["nonzero_fraction"] = (code_size - zeros) / code_size
    return {k: v.astype(np.float64) for k, v in per.items()}


def mean_and_std(values: np.ndarray, ddof: int) -> tuple[float, float | None]:
    """Mean and std of a 1-D sample (`ddof=1`: torch's unbiased std; `None` when it is undefined)."""
    values = np.asarray(values, np.float64)
    std = float(np.std(values, ddof=ddof)) if values.size > ddof else None
    return float(np.mean(values)), std


def summarize(per_sample: dict[str, np.ndarray], layers: Sequence[int] | None = None) -> list[dict]:
    """Per-layer rows (see the module docstring for the keys) from `measure_per_sample`'s output."""
    depth, m = per_sample["zero_fraction"].shape
    layers = range(depth) if layers is None else layers
    rows = []
    for layer in layers:
        row: dict = {"layer": int(layer), "num_samples": int(m)}
        for key in RATE_KEYS:
            if key in per_sample:
                row[key], row[key + "_std"] = mean_and_std(per_sample[key][layer], ddof=1)
            else:
                row[key], row[key + "_std"] = None, None
        row["sparsity"], row["sparsity_std"] = mean_and_std(per_sample["nonzero_fraction"][layer], ddof=0)
        row["zero_fraction"], row["zero_fraction_std"] = mean_and_std(per_sample["zero_fraction"][layer], ddof=0)
        row["paper_sparsity"], row["paper_sparsity_std"] = row["sparsity"], row["sparsity_std"]
        rows.append(row)
    return rows


def check_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Validates layer indices (negative ones count from the end) and returns them in `[0, depth)`."""
    if layers is None:
        return list(range(depth))
    out = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} does not exist: the model has {depth} layers (0..{depth - 1})")
        out.append(layer % depth)
    return sorted(set(out))


def measure_model(model, images, *, batch_size: int = 16, paper_eps: float = PAPER_EPS,
                  official_eps_sq: float = OFFICIAL_EPS_SQ, layers: Sequence[int] | None = None,
                  precision: str = "float64", progress: Callable[[str], None] | None = None) -> list[dict]:
    """Per-layer compression and sparsity of `model` over `images` `float32 [M, S, S, 3]` (normalised).

    Returns one dict per layer with the keys of the module docstring (for `layers`, default all); compare a
    trained model with `compare_with_init`. See `measure_per_sample` for `precision`.
    """
    layers = check_layers(layers, model.cfg.depth)
    per = measure_per_sample(model, images, batch_size=batch_size, paper_eps=paper_eps,
                             official_eps_sq=official_eps_sq, precision=precision, progress=progress)
    return summarize(per, layers)


def compare_with_init(model, images, *, seed: int = 0, **kwargs) -> dict[str, list[dict]]:
    """`{'trained': measure_model(model), 'init': measure_model(same architecture freshly initialised)}`."""
    from crate_jax.models import build_model

    init = build_model(model.cfg, seed)
    return {"trained": measure_model(model, images, **kwargs), "init": measure_model(init, images, **kwargs)}


# Attention maps and patch features for the per-image pictures ------------------------------------
def cls_attention_and_features(model, images: jax.Array, *, layer: int = -1,
                               feature: str = "mssa") -> tuple[jax.Array, jax.Array]:
    """The cls token's attention over patches and the patch features of one layer.

    Returns:
      `attn [B, K, N]`: softmax over all N+1 keys of `w_0 · w_j / sqrt(p)` (MSSA: `q = k = w`; ViT: `q_0 · k_j`),
      restricted to the N patch keys (cls column dropped, not renormalised).
      `feats [B, N, F]`: `feature='mssa'`: the layer's attention projections `[B, N, K·p]` (MSSA `w`, ViT keys);
      `feature='out'`: the layer's output tokens `[B, N, d]`. Traceable.
    """
    if feature not in ("mssa", "out"):
        raise ValueError(f"feature must be 'mssa' or 'out', got {feature!r}")
    _, caps = model(images, capture=True)
    if "mssa_w" in caps:
        q = k = caps["mssa_w"][layer]
    else:
        q, k = caps["attn_q"][layer], caps["attn_k"][layer]
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)  # [B, N+1, K, p]
    p = q.shape[-1]
    logits = jnp.einsum("bkp,bnkp->bkn", q[:, 0], k, precision=cr.HIGHEST) / math.sqrt(p)
    attn = jax.nn.softmax(logits, axis=-1)[:, :, 1:]
    if feature == "mssa":
        feats = k[:, 1:].reshape(k.shape[0], k.shape[1] - 1, -1)
    else:
        feats = caps["out"][layer][:, 1:].astype(jnp.float32)
    return attn, feats


def attention_and_features(model, images, *, layer: int = -1, feature: str = "mssa",
                           batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Batched, jitted `cls_attention_and_features` over `images [M, S, S, 3]`: `([M, K, N], [M, N, F])`."""
    depth = model.cfg.depth
    layer = check_layers([layer], depth)[0]
    fn = _jitted(model, cls_attention_and_features, layer=layer, feature=feature)
    images = np.asarray(images)
    attns, feats = [], []
    for start, batch in iterate_batches(images, batch_size):
        a, f = jax.device_get(fn(jnp.asarray(batch)))
        keep = min(batch.shape[0], images.shape[0] - start)
        attns.append(np.asarray(a)[:keep])
        feats.append(np.asarray(f)[:keep])
    return np.concatenate(attns), np.concatenate(feats)
