"""Autoregressive decoding with a cache, jitted end to end (prefill + a `fori_loop` of single-token steps).

The cache holds, per layer, what later tokens attend to. MSSA shares one projection for query, key
and value (`q = k = v = w = LN1(x) U`, docs/math.md §CRATE, §Language models), so CRATE-GPT and the CRATE-α LM keep **one**
tensor per layer, `w [depth, B, T_max, K, p]`; GPT-2 keeps two, `k` and `v`. For the same width the
MSSA cache is half the size (`cache_bytes`).

Each step runs the blocks of `crate_jax.models.blocks` on the new token(s) through their own
sub-modules (the same parameters, the same math, no dropout), attending to the cached positions
`<= pos` through `crate_jax.models.layers.attend` with an explicit mask. `decode_no_cache` recomputes
the whole prefix at every step: the reference that cached decoding must reproduce.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.models import layers as L
from crate_jax.models.config import ConfigError
from crate_jax.models.lm import LanguageModel, LMConfig


def cache_names(cfg: LMConfig) -> tuple[str, ...]:
    """The per-layer cache tensors: `('w',)` for MSSA (q = k = v), `('k', 'v')` for GPT-2."""
    return ("k", "v") if cfg.model == "gpt2" else ("w",)


def cache_shape(cfg: LMConfig, batch: int, length: int | None = None) -> tuple[int, ...]:
    return (cfg.depth, batch, length or cfg.block_size, cfg.num_heads, cfg.head_dim)


def init_cache(cfg: LMConfig, batch: int, length: int | None = None, dtype=None) -> dict[str, jax.Array]:
    """Zeros for every cache tensor, `[depth, B, length, K, p]` in the compute dtype (or `dtype`)."""
    dt = jnp.dtype(dtype or cfg.dtype)
    return {n: jnp.zeros(cache_shape(cfg, batch, length), dt) for n in cache_names(cfg)}


def cache_bytes(cfg: LMConfig, batch: int, length: int | None = None, dtype=None) -> int:
    """Bytes of the whole cache: `len(cache_names) · depth · B · length · d · itemsize`."""
    dt = jnp.dtype(dtype or cfg.dtype)
    return len(cache_names(cfg)) * int(np.prod(cache_shape(cfg, batch, length))) * dt.itemsize


def _mask(pos, new: int, length: int) -> jax.Array:
    """`[1, 1, new, length]`: query `i` (absolute position `pos + i`) sees keys `<= pos + i`."""
    q = pos + jnp.arange(new)[:, None]
    return (jnp.arange(length)[None, :] <= q)[None, None]


def _write(cache_layer, value, pos):
    return jax.lax.dynamic_update_slice_in_dim(cache_layer, value.astype(cache_layer.dtype), pos, axis=1)


def _block_step(model_name: str, block, x, cache: dict, pos):
    """One block on the new tokens `x [B, S, d]` at positions `pos..pos+S-1`, updating this layer's cache."""
    S, T = x.shape[1], next(iter(cache.values())).shape[1]
    mask = _mask(pos, S, T)
    if model_name == "gpt2":  # ViTBlock: x += attn(LN1 x); x += MLP(LN2 x)
        h = block.ln1(x)
        a = block.attn
        q, k, v = a.query(h), a.key(h), a.value(h)
        cache = {"k": _write(cache["k"], k, pos), "v": _write(cache["v"], v, pos)}
        o = L.attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), impl=a.attention, mask=mask)
        x = x + a.out(o)
        return x + block.mlp(block.ln2(x)), cache
    w = block.mssa.proj(block.ln1(x))  # [B, S, K, p]: q = k = v = w
    cache = {"w": _write(cache["w"], w, pos)}
    c = cache["w"].astype(w.dtype)
    o = block.mssa.out(L.attend(w, c, c, impl=block.mssa.attention, mask=mask))
    if model_name == "crate_gpt":  # CrateBlock: z = x + MSSA(LN1 x); x = ISTA(LN2 z), no residual
        return block.ista(block.ln2(x + o)), cache
    x = x + o  # CrateAlphaBlock: x += MSSA(LN_0 x); x += ODL(LN_1 x)
    y = block.odl(block.ln2(x))
    return (x + y if block.residual else y), cache


def forward_with_cache(model: LanguageModel, tokens: jax.Array, cache: dict, pos) -> tuple[jax.Array, dict]:
    """Logits `[B, S, table_size]` of `tokens [B, S]` placed at positions `pos..pos+S-1`, attending to the
    `cache` (positions `< pos` already filled); returns the updated cache. Traceable (`pos` may be traced)."""
    cfg = model.cfg
    x = model.embed_tokens(tokens, pos)
    graphdef, params = nnx.split(model.encoder.blocks)

    def layer(x, xs):
        p, c = xs
        x, c = _block_step(cfg.model, nnx.merge(graphdef, p), x, c, pos)
        return x, c

    x, cache = jax.lax.scan(layer, x, (params, cache))
    return model.head(x), cache


def _sample(logits, key, temperature: float, top_k: int | None, vocab_size: int):
    """Next token from `logits [B, V']` (float32): greedy for temperature 0, else softmax(logits / T),
    optionally restricted to the `top_k` largest."""
    logits = logits[:, :vocab_size].astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, vocab_size))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_lengths(cfg: LMConfig, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len < 1:
        raise ConfigError("the prompt is empty: generation needs at least one token to start from")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.block_size:
        room = cfg.block_size - prompt_len
        fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room >= 1 else
               f"shorten the prompt to at most {cfg.block_size - 1} tokens (at least one new token must fit)")
        raise ConfigError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"block size {cfg.block_size} (its learned positions end there); {fix}")


@functools.lru_cache(maxsize=16)
def _generate_fn(graphdef, cfg: LMConfig, batch: int, prompt_len: int, max_new: int, temperature: float,
                 top_k: int | None, cache_len: int):
    def run(state, prompt, key):
        model = nnx.merge(graphdef, state)
        cache = init_cache(cfg, batch, cache_len)
        logits, cache = forward_with_cache(model, prompt, cache, 0)  # prefill
        keys = jax.random.split(key, max_new)
        first = _sample(logits[:, -1], keys[0], temperature, top_k, cfg.vocab_size)
        out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(first)

        def body(i, carry):
            out, cache = carry
            tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
            logits, cache = forward_with_cache(model, tok, cache, prompt_len + i - 1)
            nxt = _sample(logits[:, -1], keys[i], temperature, top_k, cfg.vocab_size)
            return out.at[:, i].set(nxt), cache

        out, _ = jax.lax.fori_loop(1, max_new, body, (out, cache))
        return out
    return jax.jit(run)


def generate(model: LanguageModel, prompt, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """`[B, P + max_new_tokens]` int32: the prompt followed by the sampled continuation (greedy when
    `temperature == 0`). One jitted program: prefill of the prompt, then one cached step per token."""
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    cfg = model.cfg
    check_lengths(cfg, prompt.shape[1], max_new_tokens)
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    graphdef, state = nnx.split(model)
    fn = _generate_fn(graphdef, cfg, prompt.shape[0], prompt.shape[1], int(max_new_tokens), float(temperature),
                      int(top_k) if top_k else None, prompt.shape[1] + int(max_new_tokens))
    new = fn(state, jnp.asarray(prompt), jax.random.key(seed))
    return np.concatenate([prompt, np.asarray(new)], axis=1)


def decode_no_cache(model: LanguageModel, prompt, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding that recomputes the full prefix at every step (no cache): `(tokens [B, P+N],
    logits of each chosen step [B, N, V])`. The reference for the cached path."""
    prompt = np.asarray(prompt, np.int32)
    cfg = model.cfg
    check_lengths(cfg, prompt.shape[1], max_new_tokens)
    B, P = prompt.shape
    total = P + max_new_tokens
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))  # one compile: the buffer has a fixed length
    buf = np.zeros((B, total), np.int32)
    buf[:, :P] = prompt
    steps = []
    for t in range(P, total):
        logits = np.asarray(fwd(state, jnp.asarray(buf)), np.float32)[:, t - 1, :cfg.vocab_size]
        steps.append(logits)
        buf[:, t] = np.argmax(logits, axis=-1)
    return buf, np.stack(steps, axis=1)


def cached_step_logits(model: LanguageModel, tokens) -> np.ndarray:
    """Logits `[B, T, V]` of `tokens [B, T]` fed one position at a time through the cache (for tests)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])

        def body(cache, t):
            tok = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
            logits, cache = forward_with_cache(m, tok, cache, t)
            return cache, logits[:, 0]
        _, out = jax.lax.scan(body, cache, jnp.arange(tokens.shape[1]))
        return jnp.swapaxes(out, 0, 1)
    return np.asarray(run(state, tokens), np.float32)[..., :cfg.vocab_size]
