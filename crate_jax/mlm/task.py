"""Masked language modelling as a task of the shared engine: `config.task = 'mlm'` (CRATE-BERT or BERT).

The task supplies the encoder (`crate_jax.models.bert`), the masked-token cross-entropy (mean over the
positions whose label is not −100), the packed, dynamically masked rows of `crate_jax.mlm.data` and the
FLOPs for MFU (3 × the forward's matmuls and attention, `crate_jax.models.bert.train_flops_per_token`).
Its evaluator is `mlm_loss` (`crate_jax.mlm.evaluators`): held-out masked-token loss and accuracy.

Config keys (values of the recipe in `configs/mlm.py`): seq_len (T), seed, model.{name ('crate_bert' |
'bert'), variant, **BertConfig overrides}, data.{dir, num_threads}, masking.{prob, mask_frac, random_frac}.
Both models take RoBERTa's embeddings here (positions from the ids, pad id of `crate_jax.mlm.data.MLMVocab`,
`max_positions = T + pad + 1`, 514 for T = 512), so CRATE-BERT and BERT differ only in their layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from crate_jax.models.bert import BERT_MODELS, BertConfig, bert_config, build_bert, train_flops_per_token
from crate_jax.errors import ConfigError
from crate_jax.train.task import TaskBase
from crate_jax.train.validate import known_keys, need_int

DATA_KEYS = ("dir", "num_threads")
MASKING_KEYS = ("prob", "mask_frac", "random_frac")


def mlm_config_from(config: ConfigDict, vocab=None) -> BertConfig:
    """`config.model` = {name, variant, **BertConfig overrides}, RoBERTa embeddings over `vocab` (an `MLMVocab`;
    None without data: the RoBERTa BPE's 50,265 ids and pad 1)."""
    m = dict(config.get("model", None) or {})
    name, variant = m.pop("name", None), m.pop("variant", None)
    if name not in BERT_MODELS:
        raise ConfigError(f"config.model.name: got {name!r}, expected one of {BERT_MODELS}")
    T = config.get("seq_len")
    if not isinstance(T, int) or isinstance(T, bool) or T < 3:
        raise ConfigError(f"config.seq_len: expected the row length in tokens (an integer >= 3), got {T!r}")
    pad = vocab.pad if vocab is not None else 1
    fields = dict(positions="roberta", pad_token_id=pad, max_positions=T + pad + 1, layer_norm_eps=1e-12)
    fields["vocab_size"] = vocab.size if vocab is not None else 50265
    fields.update(m)
    return bert_config(name, variant or None, **fields)


def masked_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(nll [B, T], correct [B, T], chosen [B, T])` in float32; `nll` and `correct` are 0 where the label is −100.
    Compare-and-sum over the vocabulary, so a vocabulary sharded over `tensor` reduces locally."""
    logits = logits.astype(jnp.float32)
    chosen = labels >= 0
    hit = jnp.arange(logits.shape[-1]) == labels[..., None]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    c = chosen.astype(jnp.float32)
    return nll * c, correct * c, c


class MLMTask(TaskBase):
    """`config.task = 'mlm'`: batches `{'tokens', 'labels': int32 [B, T]}` (labels −100 where not masked)."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        data = config.get("data", None) or ConfigDict()
        known_keys(data, "data", DATA_KEYS)
        masking = dict(config.get("masking", None) or {})
        unknown = sorted(set(masking) - set(MASKING_KEYS))
        if unknown:
            raise ConfigError(f"config.masking: unknown keys {unknown}; known: {list(MASKING_KEYS)}")
        from crate_jax.mlm.data import Masking
        try:
            self.masking = Masking(**masking)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.masking: {e}") from None
        self.data_dir = data.get("dir") or None
        self._dataset = self._vocab = None
        self.model_cfg = mlm_config_from(config, self.vocab if self.data_dir else None)

    @property
    def dataset(self):
        if self._dataset is None:
            from crate_jax.data.tokens.loader import TokenDataError, TokenDataset
            if not self.data_dir:
                raise ConfigError("config.data.dir is empty: pass data=DIR, a directory written by "
                                  "`python -m crate_jax.data.tokens.prepare`")
            try:
                self._dataset = TokenDataset(self.data_dir)
            except TokenDataError as e:
                raise ConfigError(f"config.data.dir: {e}") from None
        return self._dataset

    @property
    def vocab(self):
        if self._vocab is None:
            from crate_jax.data.tokens.loader import TokenDataError
            from crate_jax.mlm.data import MLMVocab
            try:
                self._vocab = MLMVocab.of(self.dataset)
            except TokenDataError as e:
                raise ConfigError(f"config.data.dir: {e}") from None
        return self._vocab

    def describe(self) -> str:
        c = self.model_cfg
        return (f"{c.model} {c.variant} masked LM (width {c.width}, depth {c.depth}, {c.num_heads} heads, vocab "
                f"{c.vocab_size}, rows of {self.config.seq_len} tokens)")

    def validate(self, mesh) -> None:
        need_int(self.config, "data.num_threads", 1, optional=True)
        if self.data_dir and self.vocab.size > self.model_cfg.vocab_size:
            raise ConfigError(f"config.data.dir {self.data_dir}: the data needs {self.vocab.size} ids but the "
                              f"model's vocabulary is {self.model_cfg.vocab_size}; raise model.vocab_size (or unset it)")

    def build_model(self, seed: int):
        return build_bert(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        T = int(self.config.seq_len)
        return {"tokens": jax.ShapeDtypeStruct((T,), np.int32), "labels": jax.ShapeDtypeStruct((T,), np.int32)}

    def loss(self, model, batch, rng, extras):
        nll, correct, chosen = masked_nll(model(batch["tokens"], train=True, rng=rng), batch["labels"])
        n = jnp.maximum(jnp.sum(chosen), 1.0)
        return jnp.sum(nll) / n, {"train/mlm_accuracy": jnp.sum(correct) / n}, None

    def flops_per_example(self) -> float:
        T = int(self.config.seq_len)
        return float(T * train_flops_per_token(self.model_cfg, T))

    def tokens_per_example(self) -> int:
        return int(self.config.seq_len)

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        from crate_jax.mlm.data import MLMTrainIterator
        return MLMTrainIterator(self.dataset, self.vocab, seq_len=int(self.config.seq_len), batch_size=batch_size,
                                seed=int(self.config.seed), masking=self.masking, process_index=process_index,
                                process_count=process_count,
                                num_threads=int(self.config.data.get("num_threads", 2) or 2))
