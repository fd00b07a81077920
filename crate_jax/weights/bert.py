"""Masked-LM encoder weight layouts <-> our `MaskedEncoder` tree (`crate_jax.models.bert`).

    python -m crate_jax.convert --format crate-bert-hf --input model.safetensors --output bundles/crate_bert
    python -m crate_jax.convert --format bert-hf --input pytorch_model.bin --output bundles/bert_base
    python -m crate_jax.convert --format roberta-hf --input model.safetensors --output bundles/roberta_base

| fmt | model | names (prefix of the encoder) |
|---|---|---|
| `crate-bert-hf` | CRATE-BERT | `CrateForMaskedLM` of `transformers` PR #27759 (`crate.`), or its bare `CrateModel` |
| `bert-hf` | BERT | `BertForMaskedLM` / `BertForPreTraining` (`bert.`), or a bare `BertModel` |
| `roberta-hf` | BERT with RoBERTa positions | `RobertaForMaskedLM` (`roberta.`), or a bare `RobertaModel` |

Encoder names (after the prefix): `embeddings.{word_embeddings, position_embeddings, token_type_embeddings}.weight`,
`embeddings.LayerNorm.{weight,bias}`, per layer `encoder.layer.{i}.` — CRATE-BERT:
`attention.self.prenorm.{weight,bias}`, `attention.self.qkv.weight [d, d]` (torch Linear `[out, in]`, head index
outer), `attention.output.dense.weight`, `output.weight` (the ISTA dictionary, used as is),
`output.prenorm.{weight,bias}`; BERT: `attention.self.{query,key,value}`, `attention.output.dense`,
`attention.output.LayerNorm`, `intermediate.dense`, `output.dense`, `output.LayerNorm`; then `pooler.dense`
(bare models). MLM heads (no prefix): `lm_head.{dense, layer_norm}`, `lm_head.bias` (CRATE-BERT, RoBERTa) or
`cls.predictions.{transform.dense, transform.LayerNorm, bias}` (BERT); the tied `*.decoder.{weight,bias}` that
`save_pretrained` omits are accepted when equal to the word embeddings / head bias. BERT's next-sentence head
`cls.seq_relationship.*` and the `position_ids` / `token_type_ids` buffers are ignored; TF-era
`LayerNorm.gamma / beta` names are read as `weight / bias`. A `BertForSequenceClassification` classifier
(`classifier.{weight,bias}` next to the pooler) is read and written by `bert-hf`.

The sizes come from the shapes; the head count from the size table (`crate_jax.models.bert.BERT_VARIANTS`) or
`--heads`; what the files do not record is the layout's own: pad id 1 and RoBERTa positions (CRATE-BERT,
RoBERTa), pad id 0 and absolute positions (BERT), LayerNorm eps 1e-12 (BERT, CRATE-BERT's embeddings and head)
or 1e-5 (RoBERTa). Every tensor is checked first (one error lists everything wrong); the maps are
transposes and reshapes only, so `import -> export -> import` is exact bit for bit. Export writes the
`*ForMaskedLM` names (with the prefix) for a model with an MLM head, the bare model's otherwise.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from crate_jax.models.bert import BERT_VARIANTS, BertConfig, bert_config
from crate_jax.errors import ConfigError
from crate_jax.weights.layouts import flatten_tree
from crate_jax.weights.layout_check import raise_on_mismatch
from crate_jax.weights.readers import WeightsError, read_tensors

FORMATS = {"crate-bert-hf": "crate_bert", "bert-hf": "bert", "roberta-hf": "bert"}
PREFIX = {"crate-bert-hf": "crate.", "bert-hf": "bert.", "roberta-hf": "roberta."}
HEAD = {"crate-bert-hf": "lm_head", "bert-hf": "cls.predictions", "roberta-hf": "lm_head"}
# What the state_dicts do not record: the layout's pad id, positions and LayerNorm eps.
TABLES = {"crate-bert-hf": dict(pad_token_id=1, positions="roberta", layer_norm_eps=1e-12),
          "bert-hf": dict(pad_token_id=0, positions="absolute", layer_norm_eps=1e-12),
          "roberta-hf": dict(pad_token_id=1, positions="roberta", layer_norm_eps=1e-5)}
_IGNORED = re.compile(r"^(cls\.seq_relationship\.|.*embeddings\.(position_ids|token_type_ids)$)")
_LAYER = re.compile(r"^[a-z]+\.encoder\.layer\.(\d+)\.")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise WeightsError(f"unknown BERT weight format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def normalise_names(fmt: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips DDP's `module.` / torch.compile's `_orig_mod.`, reads TF-era `gamma / beta`, and puts the encoder
    prefix on a bare model's names."""
    check_format(fmt)
    out = dict(tensors)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    out = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
           for k, v in out.items()}
    p, head = PREFIX[fmt], HEAD[fmt]
    if "embeddings.word_embeddings.weight" in out and not any(k.startswith(p) for k in out):
        out = {(k if k.startswith((head + ".", "cls.", "classifier.")) else p + k): v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------------------
# Rules: (official name, our '/'-path, official shape, to_ours, to_official)
# ------------------------------------------------------------------------------------------------------------
def _rules(fmt: str, cfg: BertConfig) -> list[tuple]:
    d, K, p, V = cfg.width, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    same = (lambda a: a, lambda a: a)
    linear = (lambda w: w.T, lambda k: k.T)  # torch Linear [out, in] <-> our kernel [in, out]
    q_in = (lambda w: w.T.reshape(d, K, p), lambda k: k.reshape(d, K * p).T)
    q_out = (lambda w: w.T.reshape(K, p, d), lambda k: k.reshape(K * p, d).T)
    head_bias = (lambda b: b.reshape(K, p), lambda b: b.reshape(K * p))
    P, L, b = PREFIX[fmt], PREFIX[fmt] + "encoder.layer.{i}.", "encoder/blocks/"
    ln = lambda official, ours: [(official + ".weight", ours + "/scale", (d,)) + same,
                                 (official + ".bias", ours + "/bias", (d,)) + same]
    rules = [(P + "embeddings.word_embeddings.weight", "embeddings/word/embedding", (V, d)) + same,
             (P + "embeddings.position_embeddings.weight", "embeddings/position", (cfg.max_positions, d)) + same,
             (P + "embeddings.token_type_embeddings.weight", "embeddings/token_type", (cfg.type_vocab_size, d)) + same,
             *ln(P + "embeddings.LayerNorm", "embeddings/norm")]
    if cfg.model == "crate_bert":
        rules += [*ln(L + "attention.self.prenorm", b + "ln1"),
                  (L + "attention.self.qkv.weight", b + "mssa/proj/kernel", (d, d)) + q_in,
                  (L + "attention.output.dense.weight", b + "mssa/out/kernel", (d, d)) + q_out,
                  (L + "output.weight", b + "ista/D", (d, d)) + same,
                  *ln(L + "output.prenorm", b + "ln2")]
    else:
        m = cfg.block.mlp_dim
        for name in ("query", "key", "value"):
            rules += [(L + f"attention.self.{name}.weight", f"{b}attn/{name}/kernel", (d, d)) + q_in,
                      (L + f"attention.self.{name}.bias", f"{b}attn/{name}/bias", (d,)) + head_bias]
        rules += [(L + "attention.output.dense.weight", b + "attn/out/kernel", (d, d)) + q_out,
                  (L + "attention.output.dense.bias", b + "attn/out/bias", (d,)) + same,
                  *ln(L + "attention.output.LayerNorm", b + "ln1"),
                  (L + "intermediate.dense.weight", b + "fc1/kernel", (m, d)) + linear,
                  (L + "intermediate.dense.bias", b + "fc1/bias", (m,)) + same,
                  (L + "output.dense.weight", b + "fc2/kernel", (d, m)) + linear,
                  (L + "output.dense.bias", b + "fc2/bias", (d,)) + same,
                  *ln(L + "output.LayerNorm", b + "ln2")]
    if cfg.pooler:
        rules += [(P + "pooler.dense.weight", "pooler/kernel", (d, d)) + linear,
                  (P + "pooler.dense.bias", "pooler/bias", (d,)) + same]
    if cfg.num_labels:
        rules += [("classifier.weight", "classifier/kernel", (cfg.num_labels, d)) + linear,
                  ("classifier.bias", "classifier/bias", (cfg.num_labels,)) + same]
    if cfg.mlm_head:
        h = HEAD[fmt]
        dense, norm = ((h + ".dense", h + ".layer_norm") if h == "lm_head"
                       else (h + ".transform.dense", h + ".transform.LayerNorm"))
        rules += [(dense + ".weight", "mlm_head/dense/kernel", (d, d)) + linear,
                  (dense + ".bias", "mlm_head/dense/bias", (d,)) + same,
                  *ln(norm, "mlm_head/norm"),
                  (h + ".bias", "mlm_head/bias", (V,)) + same]
    return rules


def _names(official: str, depth: int) -> list[str]:
    return [official.format(i=i) for i in range(depth)] if "{i}" in official else [official]


def expected_shapes(fmt: str, cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(shape) for official, _, shape, *_ in _rules(fmt, cfg) for name in _names(official, cfg.depth)}


def layout_problems(fmt: str, cfg) -> list[str]:
    """Why `cfg` has no exact counterpart in `fmt` (empty: it has one)."""
    model = check_format(fmt)
    if not isinstance(cfg, BertConfig) or cfg.model != model:
        return [f"it is not a {model} encoder (the {fmt} layout holds {model} models)"]
    official = dict(TABLES[fmt], eta=0.1, lmbda=0.1) if model == "crate_bert" else dict(TABLES[fmt])
    if model == "crate_bert":
        official["ln_eps"] = 1e-5
    out = [f"{k}={getattr(cfg, k)!r} (the official model has {k}={v!r})" for k, v in official.items()
           if getattr(cfg, k) != v]
    if cfg.num_labels and fmt != "bert-hf":
        out.append("it has a classifier, which only the bert-hf layout (BertForSequenceClassification) holds")
    return out


# ------------------------------------------------------------------------------------------------------------
# Shapes -> config, checks, mapping
# ------------------------------------------------------------------------------------------------------------
def infer_config(fmt: str, tensors: Mapping[str, np.ndarray], heads: int | None = None, source: str = "weights",
                 **overrides) -> BertConfig:
    """The config the shapes imply (vocab, width, positions, types, depth, MLP width, which heads exist); heads
    from the size table or `heads`; pad id, positions and eps from the layout (`TABLES`)."""
    model = check_format(fmt)
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    P = PREFIX[fmt]
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight"):
        if len(shapes.get(P + key, ())) != 2:
            other = next((f for f, q in PREFIX.items() if f != fmt and any(k.startswith(q) for k in shapes)), None)
            hint = f"; the names look like the {other} layout: pass --format {other}" if other else ""
            raise WeightsError(f"{source}: no 2-D '{P + key}', so this is not a {fmt} state_dict (first names: "
                               f"{', '.join(sorted(shapes)[:6])}){hint}")
    vocab, width = shapes[P + "embeddings.word_embeddings.weight"]
    ids = [int(m.group(1)) for m in map(_LAYER.match, shapes) if m]
    if not ids:
        raise WeightsError(f"{source}: no '{P}encoder.layer.{{i}}.' layers found")
    depth = max(ids) + 1
    if heads is None:
        heads = next((k for (w, dp, k, _) in BERT_VARIANTS[model].values() if (w, dp) == (width, depth)), None)
        if heads is None:
            sizes = ", ".join(f"{n}: width {w}, depth {dp}" for n, (w, dp, _, _) in BERT_VARIANTS[model].items())
            raise WeightsError(f"{source}: width {width} and depth {depth} match no {model} size ({sizes}), and the "
                               f"{fmt} layout does not record the number of heads; pass --heads K")
    head = HEAD[fmt]
    fields = dict(width=width, depth=depth, num_heads=int(heads), vocab_size=vocab,
                  max_positions=shapes[P + "embeddings.position_embeddings.weight"][0],
                  type_vocab_size=shapes[P + "embeddings.token_type_embeddings.weight"][0], **TABLES[fmt],
                  mlm_head=any(k.startswith(head + ".") for k in shapes),
                  pooler=any(k.startswith(P + "pooler.") for k in shapes))
    if fmt == "bert-hf" and len(shapes.get("classifier.weight", ())) == 2:
        fields["num_labels"] = shapes["classifier.weight"][0]
    if model == "bert":
        fc = shapes.get(P + "encoder.layer.0.intermediate.dense.weight")
        fields["mlp_dim"] = fc[0] if fc is not None and len(fc) == 2 else 4 * width
    fields.update(overrides)
    name = next((n for n, (w, dp, k, _) in BERT_VARIANTS[model].items()
                 if (w, dp, k) == (fields["width"], fields["depth"], fields["num_heads"])), None)
    try:
        return bert_config(model, name, **fields)  # 'custom' outside the size tables
    except ConfigError as e:
        raise WeightsError(f"{source}: the shapes imply a model that cannot be built: {e}") from None


def _tied(fmt: str) -> dict[str, str]:
    """Tied decoder names -> the tensor they must equal."""
    h = HEAD[fmt]
    return {h + ".decoder.weight": PREFIX[fmt] + "embeddings.word_embeddings.weight", h + ".decoder.bias": h + ".bias"}


def check_layout(fmt: str, tensors: Mapping[str, np.ndarray], cfg: BertConfig, source: str = "weights") -> None:
    """One `WeightsError` listing every missing, unexpected, mis-shaped and non-float tensor, and an untied decoder."""
    tied = _tied(fmt) if cfg.mlm_head else {}
    untied = [f"{k} differs from {src}: the decoder is tied to it, so an untied decoder cannot be imported"
              for k, src in tied.items() if k in tensors and src in tensors
              and (np.shape(tensors[k]) != np.shape(tensors[src]) or not np.array_equal(tensors[k], tensors[src]))]
    raise_on_mismatch(tensors, expected_shapes(fmt, cfg), ignore=lambda k: k in tied or bool(_IGNORED.match(k)),
                      notes=untied, header=f"{source} does not match the {fmt} layout of {describe(cfg)}:",
                      hint="crate-bert-hf / bert-hf / roberta-hf")


def describe(cfg: BertConfig) -> str:
    """'crate_bert base (width 768, depth 12, 12 heads, vocab 50265, 514 positions, MLM head)'."""
    parts = [p for p, on in (("MLM head", cfg.mlm_head), ("pooler", cfg.pooler),
                             (f"{cfg.num_labels}-way classifier", cfg.num_labels)) if on]
    return (f"{cfg.model} {cfg.variant} (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, vocab "
            f"{cfg.vocab_size}, {cfg.max_positions} positions{', ' + ', '.join(parts) if parts else ''})")


def to_params(fmt: str, tensors: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
    """Our nested tree (numpy, `cfg.param_dtype`, per-layer tensors stacked `[depth, ...]`)."""
    import jax.numpy as jnp
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for official, ours, _, to_ours, _ in _rules(fmt, cfg):
        arrays = [to_ours(np.asarray(tensors[n])) for n in _names(official, cfg.depth)]
        value = np.stack(arrays) if "{i}" in official else arrays[0]
        node = params
        *parents, leaf = ours.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.ascontiguousarray(value.astype(dtype, copy=False))
    return params


def from_params(fmt: str, params: Mapping, cfg: BertConfig) -> dict[str, np.ndarray]:
    """The official flat dict of `fmt` (dtypes kept, bits unchanged), without the tied decoder (as
    `save_pretrained` writes it); a model without an MLM head gets the bare model's names (no prefix)."""
    problems = layout_problems(fmt, cfg)
    if problems:
        raise WeightsError(f"cannot export {describe(cfg)} to {fmt}: " + "; ".join(problems))
    flat = {"/".join(path): np.asarray(v) for path, v in flatten_tree(params)}
    out: dict[str, np.ndarray] = {}
    used = set()
    for official, ours, _, _, to_official in _rules(fmt, cfg):
        if ours not in flat:
            raise WeightsError(f"parameter tree has no '{ours}', which the {fmt} layout needs for '{official}'")
        used.add(ours)
        value = flat[ours]
        for name, part in zip(_names(official, cfg.depth), list(value) if "{i}" in official else [value]):
            out[name] = np.ascontiguousarray(to_official(part))
    extra = sorted(set(flat) - used)
    if extra:
        raise WeightsError(f"the {fmt} layout has no place for parameters {extra}")
    if not (cfg.mlm_head or cfg.num_labels):  # a bare model: names without the encoder prefix
        p = PREFIX[fmt]
        out = {k[len(p):] if k.startswith(p) else k: v for k, v in out.items()}
    return out


def import_tensors(fmt: str, tensors: Mapping[str, np.ndarray], *, heads: int | None = None,
                   source: str = "weights", **overrides) -> tuple[BertConfig, dict]:
    """`(cfg, params)` from a flat dict of official tensors (checked first, all problems in one error)."""
    check_format(fmt)
    tensors = normalise_names(fmt, tensors)
    cfg = infer_config(fmt, tensors, heads, source, **overrides)
    check_layout(fmt, tensors, cfg, source)
    return cfg, to_params(fmt, tensors, cfg)


def import_bert(fmt: str, path: str | os.PathLike, *, heads: int | None = None, **overrides) -> tuple[BertConfig, dict]:
    """Reads a `.bin`/`.pt`/`.pth`, `.safetensors` or `.npz` state_dict of layout `fmt`."""
    check_format(fmt)
    return import_tensors(fmt, read_tensors(path), heads=heads, source=str(path), **overrides)
