"""Language models (crate_jax.models.lm): parameter counts pinned to docs/math.md, parity with the float64 reference
through the importers, causality, cache == no cache, scan == unrolled, vocab sharding axes."""

import jax
import numpy as np
import pytest
from flax import nnx

import reference_lm_np as R
from crate_jax.checkpoint.bundle import model_from_params
from crate_jax.models import abstract_model, count_params
from crate_jax.models import lm_decode as D
from crate_jax.models.lm import build_lm, lm_config, param_count
from crate_jax.parallel.sharding import state_axes
from crate_jax.weights import gpt

# docs/math.md §Language models (vocab 50257, block 1024); GPT-2 small (124M); CRATE-α LM sizes are ours (docs/language.md).
PINNED = {
    ("crate_gpt", "crate"): 60_663_552, ("crate_gpt", "crate-medium"): 128_132_096,
    ("crate_gpt", "crate-large"): 242_817_280, ("crate_gpt", "crate-xl"): 451_073_600,
    ("gpt2", "gpt2"): 124_439_808,
    ("crate_alpha", "S"): 69_379_776, ("crate_alpha", "B"): 110_201_088,
}
TOL = 1e-5
V, T, DIM, DEPTH, HEADS = 61, 24, 32, 2, 4


@pytest.mark.parametrize("model,variant", sorted(PINNED))
def test_lm_parameter_counts(model, variant):
    cfg = lm_config(model, variant, scan=True)
    assert count_params(abstract_model(cfg)) == param_count(cfg) == PINNED[(model, variant)]


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return (float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
            float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))))


def init_params(cfg, seed):
    """Fresh parameters (nested numpy dict)."""
    return nnx.to_pure_dict(nnx.state(build_lm(cfg, seed), nnx.Param))


build = build_lm  # eager init (cheaper than compiling it for a tiny model); the forward passes are jitted


def jitted(m, columns=V):
    """The model's forward, jitted: `tokens -> logits[..., :columns]` (numpy)."""
    graphdef, state = nnx.split(m)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return lambda t: np.asarray(fwd(state, t))[..., :columns]


def tokens(n=2, t=16, seed=5, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (n, t))


@pytest.mark.parametrize("fmt", ["crate-gpt-torch", "gpt2-hf"])
def test_parity_with_float64_reference_through_the_importer(fmt):
    make, forward = {"crate-gpt-torch": (R.random_crate_gpt_state_dict, R.crate_gpt_forward),
                     "gpt2-hf": (R.random_gpt2_hf_state_dict, R.gpt2_forward)}[fmt]
    sd = {k: np.asarray(v, np.float32) for k, v in make(0, vocab=V, block=T, dim=DIM, depth=DEPTH).items()}
    cfg, params = gpt.import_lm_tensors(fmt, sd, heads=HEADS)
    assert (cfg.vocab_size, cfg.block_size, cfg.width, cfg.depth) == (V, T, DIM, DEPTH)
    x = tokens()
    ref = forward(sd, x, heads=HEADS)
    l2, mx = rel(jitted(model_from_params(cfg, params), cfg.vocab_size)(x), ref)
    print(f"parity {fmt}: rel L2 {l2:.2e}, rel max-abs {mx:.2e}")
    assert l2 <= TOL and mx <= TOL and np.std(ref) > 0.1
    # the official layout back, bit for bit (the buffers aside)
    back = gpt.from_params(fmt, params, cfg)
    for k, v in sd.items():
        if not k.endswith(("attn.bias", "attn.masked_bias")):
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_crate_alpha_lm_parity_and_vocab_padding():
    cfg = lm_config("crate_alpha", "S", width=DIM, depth=DEPTH, num_heads=HEADS, vocab_size=V, block_size=T)
    padded = cfg.replace(vocab_multiple=16)  # 64 rows, 3 of them padding
    rng = np.random.default_rng(1)
    params = jax.tree.map(np.array, init_params(padded, 3))
    for ln in ("ln1", "ln2"):  # randomised LayerNorms
        params["encoder"]["blocks"][ln]["scale"] = (1 + 0.1 * rng.standard_normal((DEPTH, DIM))).astype(np.float32)
        params["encoder"]["blocks"][ln]["bias"] = (0.1 * rng.standard_normal((DEPTH, DIM))).astype(np.float32)
    params["embed"]["embedding"] *= 20  # O(1) embeddings, as a trained model has
    x = tokens()
    flat = {"/".join(k): v for k, v in _flat(params)}
    ref = R.crate_alpha_lm_forward(flat, x, heads=HEADS)[..., :V]
    logits = jitted(model_from_params(padded, params), 64)(x)
    assert logits.shape[-1] == 64 and np.all(logits[..., V:] < -1e8)  # the padding rows never win
    l2, mx = rel(logits[..., :V], ref)
    print(f"parity crate-alpha LM: rel L2 {l2:.2e}, rel max-abs {mx:.2e}")
    assert l2 <= TOL and mx <= TOL
    # the unpadded model with the same real rows gives the same logits
    unpadded = jax.tree.map(lambda a: a, params)
    unpadded["embed"]["embedding"] = params["embed"]["embedding"][:V]
    np.testing.assert_allclose(jitted(model_from_params(cfg, unpadded))(x), logits[..., :V], rtol=1e-5, atol=1e-5)


def _flat(tree, prefix=()):
    for k, v in tree.items():
        yield from (_flat(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


def tiny(model, **kw):
    return lm_config(model, "small", width=DIM, depth=DEPTH, num_heads=HEADS, vocab_size=V, vocab_multiple=8,
                     block_size=T, **kw)




@pytest.mark.parametrize("model", ["crate_gpt", "crate_alpha", "gpt2"])
def test_causal_cache_equals_no_cache(model):
    m = build(tiny(model), 0)
    fwd = jitted(m)
    x = tokens(t=12)
    full = fwd(x)
    # causality: changing token t changes no logit before t, and does change logits from t on
    y = x.copy()
    y[:, 6] = (y[:, 6] + 1) % V
    changed = fwd(y)
    np.testing.assert_array_equal(changed[:, :6], full[:, :6])
    assert np.abs(changed[:, 6:] - full[:, 6:]).max() > 1e-4
    # position-by-position through the cache = one full forward
    np.testing.assert_allclose(D.cached_step_logits(m, x), full, rtol=1e-5, atol=1e-5)
    # greedy decoding with the cache (one jitted program) = recomputing the prefix every step
    cached = D.generate(m, x[:, :4], 8, temperature=0.0)
    plain, _ = D.decode_no_cache(m, x[:, :4], 8)
    np.testing.assert_array_equal(cached, plain)
    if model == "crate_gpt":  # sampling: seeded, inside the vocabulary
        s1 = D.generate(m, x[:, :4], 6, temperature=1.0, top_k=5, seed=3)
        np.testing.assert_array_equal(s1, D.generate(m, x[:, :4], 6, temperature=1.0, top_k=5, seed=3))
        assert s1.max() < V and not np.array_equal(s1, cached[:, :10])
    cfg = m.cfg  # the cache layout: one tensor per layer for MSSA (q = k = v), two for GPT-2
    assert D.cache_names(cfg) == (("k", "v") if model == "gpt2" else ("w",))
    assert D.cache_bytes(cfg, 1) == len(D.cache_names(cfg)) * DEPTH * T * DIM * 4


@pytest.mark.parametrize("model", ["crate_gpt", "crate_alpha", "gpt2"])
def test_scan_equals_unrolled_and_vocab_shards_over_tensor(model):
    cfg = tiny(model, remat="full")
    a, b = build(cfg, 1), build(cfg.replace(scan=True), 1)
    x = tokens()
    np.testing.assert_allclose(jitted(a)(x), jitted(b)(x), rtol=1e-5, atol=1e-5)
    if model == "crate_alpha":  # bf16 compute over float32 parameters stays close
        c = build(cfg.replace(scan=True, dtype="bfloat16"), 1)
        assert c.embed.embedding[...].dtype == np.float32
        np.testing.assert_allclose(jitted(c)(x).astype(np.float32), jitted(b)(x), atol=0.05)
    axes = state_axes(nnx.state(abstract_model(cfg), nnx.Param))
    assert axes["embed"]["embedding"].names == ("vocab", "embed")  # LOGICAL_RULES: vocab -> tensor
    assert all(len(ax.names) > 0 for ax in jax.tree.leaves(axes, is_leaf=lambda v: hasattr(v, "names")))


def test_too_long_inputs_and_bad_sizes_are_errors():
    from crate_jax.models import ConfigError
    m = build(tiny("crate_gpt"), 0)
    with pytest.raises(ConfigError, match="block_size = 24"):
        m(tokens(t=25))
    with pytest.raises(ConfigError, match="exceeds the model's block size 24"):
        D.generate(m, tokens(t=20), 5)
    with pytest.raises(ConfigError, match="unknown crate_gpt size 'huge'"):
        lm_config("crate_gpt", "huge")
    with pytest.raises(ConfigError, match="not divisible by 5 heads"):
        lm_config("gpt2", "small", num_heads=5)
