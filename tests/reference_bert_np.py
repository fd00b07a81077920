"""Float64 numpy references for CRATE-BERT (Hugging Face `transformers` pull request #27759, `CrateForMaskedLM`)
and BERT / RoBERTa masked-LM models, written from the layouts' facts on their official state_dict names,
independently of crate_jax's code. Every torch Linear weight is `[out, in]` (`y = x Wᵀ + b`).

CRATE-BERT facts used: RoBERTa embeddings (word + token type + position, LayerNorm eps 1e-12, position ids
`cumsum(ids != pad) * (ids != pad) + pad`), per layer `x + Wo·MSSA(LN(x))` (one bias-free qkv, q = k = v,
scores / sqrt(d/h), additive key-padding mask, output dense without bias) then
`ReLU(g + 0.1(g D − g Dᵀ D) − 0.01)` with `g = LN(z)`, D = `output.weight`, no residual, both LayerNorms eps
1e-5; no final LayerNorm; MLM head dense → erf GELU → LayerNorm (1e-12) → tied decoder + `lm_head.bias`.
"""

from __future__ import annotations

import math

import numpy as np

NEG = np.finfo(np.float64).min  # the additive mask value of the torch models (finfo(dtype).min)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _lin(x, sd, name, bias=True):
    y = x @ np.asarray(sd[name + ".weight"], np.float64).T
    return y + np.asarray(sd[name + ".bias"], np.float64) if bias else y


def _erf_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def _heads(x, h):
    B, T, d = x.shape
    return x.reshape(B, T, h, d // h).transpose(0, 2, 1, 3)  # [B, h, T, p], head index outer


def _attention(q, k, v, mask, h):
    B, T, d = q.shape
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h)
    s = s + ((1.0 - mask) * NEG)[:, None, None, :]  # keys only
    return (_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, T, d)


def _embed(sd, p, ids, types, *, roberta_positions, pad, eps):
    g = lambda n: np.asarray(sd[p + n], np.float64)
    if roberta_positions:
        real = (ids != pad).astype(np.int64)
        pos = np.cumsum(real, axis=1) * real + pad
    else:
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.token_type_embeddings.weight")[types]
    x = x + g("embeddings.position_embeddings.weight")[pos]
    return _ln(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)


def _mlm_head(sd, x, head, word):
    """`head` is 'lm_head' (RoBERTa / CRATE) or 'cls.predictions' (BERT)."""
    g = lambda n: np.asarray(sd[n], np.float64)
    if head == "lm_head":
        dense, norm = "lm_head.dense", "lm_head.layer_norm"
    else:
        dense, norm = "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"
    h = _erf_gelu(_lin(x, sd, dense))
    h = _ln(h, g(norm + ".weight"), g(norm + ".bias"), 1e-12)
    return h @ word.T + g(head + ".bias")


def crate_bert_forward(sd, ids, mask=None, types=None, *, heads: int, pad: int = 1, prefix: str = "crate."):
    """MLM logits `[B, T, V]` (float64) of a `CrateForMaskedLM` state_dict."""
    ids = np.asarray(ids)
    mask = np.ones(ids.shape) if mask is None else np.asarray(mask, np.float64)
    types = np.zeros_like(ids) if types is None else np.asarray(types)
    g = lambda n: np.asarray(sd[prefix + n], np.float64)
    x = _embed(sd, prefix, ids, types, roberta_positions=True, pad=pad, eps=1e-12)
    depth = len({k.split(".")[3] for k in sd if k.startswith(prefix + "encoder.layer.")})
    for i in range(depth):
        L = f"encoder.layer.{i}."
        y = _ln(x, g(L + "attention.self.prenorm.weight"), g(L + "attention.self.prenorm.bias"), 1e-5)
        w = y @ g(L + "attention.self.qkv.weight").T
        z = x + _attention(w, w, w, mask, heads) @ g(L + "attention.output.dense.weight").T
        gz = _ln(z, g(L + "output.prenorm.weight"), g(L + "output.prenorm.bias"), 1e-5)
        D = g(L + "output.weight")
        x = np.maximum(gz + 0.1 * (gz @ D - gz @ D.T @ D) - 0.1 * 0.1, 0.0)
    return _mlm_head(sd, x, "lm_head", g("embeddings.word_embeddings.weight"))


def bert_forward(sd, ids, mask=None, types=None, *, heads: int, flavour: str = "bert", eps: float | None = None,
                 head: bool = True):
    """MLM logits (or the hidden states with `head=False`) of a `BertForMaskedLM` (`flavour='bert'`, prefix
    `bert.`, absolute positions, eps 1e-12) or `RobertaForMaskedLM` (`'roberta'`, prefix `roberta.`, RoBERTa
    positions with pad 1, eps 1e-5) state_dict; post-LN layers with erf-GELU MLPs."""
    ids = np.asarray(ids)
    mask = np.ones(ids.shape) if mask is None else np.asarray(mask, np.float64)
    types = np.zeros_like(ids) if types is None else np.asarray(types)
    roberta = flavour == "roberta"
    eps = eps if eps is not None else (1e-5 if roberta else 1e-12)
    p = "roberta." if roberta else "bert."
    g = lambda n: np.asarray(sd[p + n], np.float64)
    x = _embed(sd, p, ids, types, roberta_positions=roberta, pad=1 if roberta else 0, eps=eps)
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "encoder.layer.")})
    for i in range(depth):
        L = f"{p}encoder.layer.{i}."
        a = _attention(_lin(x, sd, L + "attention.self.query"), _lin(x, sd, L + "attention.self.key"),
                       _lin(x, sd, L + "attention.self.value"), mask, heads)
        x = _ln(x + _lin(a, sd, L + "attention.output.dense"), np.asarray(sd[L + "attention.output.LayerNorm.weight"]),
                np.asarray(sd[L + "attention.output.LayerNorm.bias"]), eps)
        h = _lin(_erf_gelu(_lin(x, sd, L + "intermediate.dense")), sd, L + "output.dense")
        x = _ln(x + h, np.asarray(sd[L + "output.LayerNorm.weight"]), np.asarray(sd[L + "output.LayerNorm.bias"]), eps)
    if not head:
        return x
    word = g("embeddings.word_embeddings.weight")
    if roberta:
        hh = _ln(_erf_gelu(_lin(x, sd, "lm_head.dense")), np.asarray(sd["lm_head.layer_norm.weight"]),
                 np.asarray(sd["lm_head.layer_norm.bias"]), eps)
        return hh @ word.T + np.asarray(sd["lm_head.bias"], np.float64)
    hh = _ln(_erf_gelu(_lin(x, sd, "cls.predictions.transform.dense")),
             np.asarray(sd["cls.predictions.transform.LayerNorm.weight"]),
             np.asarray(sd["cls.predictions.transform.LayerNorm.bias"]), eps)
    return hh @ word.T + np.asarray(sd["cls.predictions.bias"], np.float64)


# ------------------------------------------------------------------------------------------------------------
# Random state_dicts in the official layouts
# ------------------------------------------------------------------------------------------------------------
def _rand(rng, *shape, scale=0.3):
    return rng.normal(0.0, scale, shape)


def _ln_pair(rng, d):
    return 1.0 + 0.1 * rng.normal(size=d), 0.1 * rng.normal(size=d)


def random_crate_bert_state_dict(seed, *, vocab, positions, types=2, dim, depth, tied=True, pooler=False):
    """A `CrateForMaskedLM` state_dict (names with the `crate.` prefix), random values of a trained-like scale."""
    rng = np.random.default_rng(seed)
    d, sd, c = dim, {}, "crate."
    sd[c + "embeddings.word_embeddings.weight"] = _rand(rng, vocab, d)
    sd[c + "embeddings.position_embeddings.weight"] = _rand(rng, positions, d)
    sd[c + "embeddings.token_type_embeddings.weight"] = _rand(rng, types, d)
    sd[c + "embeddings.LayerNorm.weight"], sd[c + "embeddings.LayerNorm.bias"] = _ln_pair(rng, d)
    for i in range(depth):
        L = f"{c}encoder.layer.{i}."
        sd[L + "attention.self.prenorm.weight"], sd[L + "attention.self.prenorm.bias"] = _ln_pair(rng, d)
        sd[L + "attention.self.qkv.weight"] = _rand(rng, d, d, scale=d ** -0.5)
        sd[L + "attention.output.dense.weight"] = _rand(rng, d, d, scale=d ** -0.5)
        sd[L + "output.weight"] = _rand(rng, d, d, scale=d ** -0.5)
        sd[L + "output.prenorm.weight"], sd[L + "output.prenorm.bias"] = _ln_pair(rng, d)
    if pooler:
        sd[c + "pooler.dense.weight"], sd[c + "pooler.dense.bias"] = _rand(rng, d, d, scale=d ** -0.5), _rand(rng, d)
    sd["lm_head.dense.weight"], sd["lm_head.dense.bias"] = _rand(rng, d, d, scale=d ** -0.5), _rand(rng, d, scale=0.1)
    sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"] = _ln_pair(rng, d)
    sd["lm_head.bias"] = _rand(rng, vocab, scale=0.1)
    if tied:
        sd["lm_head.decoder.weight"] = sd[c + "embeddings.word_embeddings.weight"].copy()
        sd["lm_head.decoder.bias"] = sd["lm_head.bias"].copy()
    return sd


def random_bert_state_dict(seed, *, vocab, positions, types=2, dim, depth, mlp, flavour="bert", tied=True,
                           pooler=True):
    """A `BertForPreTraining`-like (`flavour='bert'`: `bert.` + pooler + `cls.predictions`) or
    `RobertaForMaskedLM` (`'roberta'`: `roberta.` + `lm_head`) state_dict."""
    rng = np.random.default_rng(seed)
    d, sd = dim, {}
    p = "roberta." if flavour == "roberta" else "bert."
    sd[p + "embeddings.word_embeddings.weight"] = _rand(rng, vocab, d)
    sd[p + "embeddings.position_embeddings.weight"] = _rand(rng, positions, d)
    sd[p + "embeddings.token_type_embeddings.weight"] = _rand(rng, types, d)
    sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"] = _ln_pair(rng, d)
    lin = lambda o, i: (_rand(rng, o, i, scale=i ** -0.5), _rand(rng, o, scale=0.1))
    for i in range(depth):
        L = f"{p}encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[L + n + ".weight"], sd[L + n + ".bias"] = lin(d, d)
        sd[L + "attention.output.LayerNorm.weight"], sd[L + "attention.output.LayerNorm.bias"] = _ln_pair(rng, d)
        sd[L + "intermediate.dense.weight"], sd[L + "intermediate.dense.bias"] = lin(mlp, d)
        sd[L + "output.dense.weight"], sd[L + "output.dense.bias"] = lin(d, mlp)
        sd[L + "output.LayerNorm.weight"], sd[L + "output.LayerNorm.bias"] = _ln_pair(rng, d)
    if pooler:
        sd[p + "pooler.dense.weight"], sd[p + "pooler.dense.bias"] = lin(d, d)
    word = sd[p + "embeddings.word_embeddings.weight"]
    if flavour == "roberta":
        sd["lm_head.dense.weight"], sd["lm_head.dense.bias"] = lin(d, d)
        sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"] = _ln_pair(rng, d)
        sd["lm_head.bias"] = _rand(rng, vocab, scale=0.1)
        if tied:
            sd["lm_head.decoder.weight"], sd["lm_head.decoder.bias"] = word.copy(), sd["lm_head.bias"].copy()
    else:
        sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"] = lin(d, d)
        (sd["cls.predictions.transform.LayerNorm.weight"],
         sd["cls.predictions.transform.LayerNorm.bias"]) = _ln_pair(rng, d)
        sd["cls.predictions.bias"] = _rand(rng, vocab, scale=0.1)
        if tied:
            sd["cls.predictions.decoder.weight"] = word.copy()
            sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].copy()
    return sd
