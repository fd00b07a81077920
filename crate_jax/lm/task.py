"""Causal language modelling as a task of the shared engine (`crate_jax.train.loop`): `config.task = 'lm'`.

The task supplies the model (`crate_jax.models.lm`: CRATE-GPT, the CRATE-α LM or GPT-2), the
next-token cross-entropy, the token data (`crate_jax.data.tokens.loader`: random windows of
`block + 1` tokens from shards written by `crate_jax.data.tokens.prepare`, one disjoint range per
process) and the FLOPs for MFU (`6N + 12·depth·d·T` per token, N counting each use of a weight
matrix, `crate_jax.models.lm.train_flops_per_token`). Its evaluator is `lm_loss`
(`crate_jax.lm.evaluators`): held-out loss and perplexity.

Config keys read here (values of the recipe in `configs/lm.py`):
  block (context length T), seed, model.{name, variant, **LMConfig overrides; vocab_size unset or 0:
  the data manifest's, or GPT-2's 50257 without data}, data.{dir, num_threads}, and per evaluator `split`,
  `max_windows`, `batch_size`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from crate_jax.errors import ConfigError
from crate_jax.models.lm import GPT2_VOCAB, LM_MODELS, LMConfig, build_lm, lm_config, train_flops_per_token
from crate_jax.train.task import TaskBase
from crate_jax.train.validate import known_keys, need_int

DATA_KEYS = ("dir", "num_threads")


def lm_config_from(config: ConfigDict, vocab_size: int | None = None) -> LMConfig:
    """`config.model` = {name, variant, **LMConfig overrides}; the context length from `config.block`."""
    m = dict(config.get("model", None) or {})
    name, variant = m.pop("name", None), m.pop("variant", None)
    if name not in LM_MODELS:
        raise ConfigError(f"config.model.name: got {name!r}, expected one of {LM_MODELS}")
    block = config.get("block")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"config.block: expected the context length in tokens (an integer >= 1), got {block!r}")
    m["block_size"] = block
    if not m.get("vocab_size"):  # the data's tokenizer; without data (AOT, benches) GPT-2's BPE, the recipe's
        m["vocab_size"] = int(vocab_size or GPT2_VOCAB)
    return lm_config(name, variant or None, **m)


def next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position `-log softmax(logits)[target]`, float32 `[B, T]`. Written as `logsumexp − logit[target]`
    with a compare-and-sum over the vocabulary, so a vocabulary sharded over `tensor` reduces locally."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


class LMTask(TaskBase):
    """`config.task = 'lm'`: batches `{'tokens': int32 [B, block + 1]}` (inputs `[:, :-1]`, targets `[:, 1:]`)."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        data = config.get("data", None) or ConfigDict()
        known_keys(data, "data", DATA_KEYS)
        self.data_dir = data.get("dir") or None
        self._dataset = None
        vocab = None
        if self.data_dir and not (config.get("model") or {}).get("vocab_size"):
            vocab = self.dataset.vocab_size
        self.model_cfg = lm_config_from(config, vocab)

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

    def describe(self) -> str:
        c = self.model_cfg
        return (f"{c.model} {c.variant} LM (width {c.width}, depth {c.depth}, {c.num_heads} heads, vocab "
                f"{c.vocab_size}, block {c.block_size})")

    def validate(self, mesh) -> None:
        need_int(self.config, "data.num_threads", 1, optional=True)
        if self.data_dir:
            ds = self.dataset
            if ds.vocab_size > self.model_cfg.vocab_size:
                raise ConfigError(f"config.data.dir {self.data_dir}: its tokenizer has {ds.vocab_size} ids but the "
                                  f"model's vocabulary is {self.model_cfg.vocab_size}; raise model.vocab_size (or unset "
                                  f"it)")

    def build_model(self, seed: int):
        return build_lm(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        return {"tokens": jax.ShapeDtypeStruct((self.model_cfg.block_size + 1,), np.int32)}

    def loss(self, model, batch, rng, extras):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1], train=True, rng=rng)
        loss = jnp.mean(next_token_nll(logits, tokens[:, 1:]))
        return loss, {"train/perplexity": jnp.exp(loss)}, None

    def flops_per_example(self) -> float:
        c = self.model_cfg
        return float(c.block_size * train_flops_per_token(c))

    def tokens_per_example(self) -> int:
        return self.model_cfg.block_size

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        from crate_jax.data.tokens.loader import LMTrainIterator
        return LMTrainIterator(self.dataset, block=self.model_cfg.block_size, batch_size=batch_size,
                               seed=int(self.config.seed), process_index=process_index, process_count=process_count,
                               num_threads=int(self.config.data.get("num_threads", 2) or 2))
