"""Fine-tuning CRATE-BERT / BERT on sentence(-pair) classification and regression: `config.task = 'glue'`.

The model is the pretrained encoder (`config.init.checkpoint`: any bundle or run of kind 'bert' — an `mlm`
run, or a `convert --format crate-bert-hf / bert-hf / roberta-hf` bundle) with a classifier on the pooled
first token (`crate_jax.models.bert.with_head`: `tanh(W x₀ + b)` then `num_labels` outputs, 1 for regression);
its MLM head is dropped, a pooler the checkpoint has is kept, the rest starts fresh. Loss: cross-entropy,
or squared error for regression (STS-B).

Data (`config.data`): `source='tfds'` reads TFDS `glue/<task>` (`data_dir`, prepared beforehand; tests use
TFDS mock data), `source='jsonl'` reads `<dir>/<split>.jsonl` with the same text fields and `label` (the demo's
offline task). Text is tokenised with the tokenizer of a directory written by `crate_jax.data.tokens.prepare`
(`data.vocab_dir`: the pretraining data, so ids and special tokens match, `crate_jax.mlm.data.MLMVocab`):
`<s> A </s>` or `<s> A </s></s> B </s>` (RoBERTa's pair format), longest text truncated first, padded to
`seq_len` with `<pad>` (masked out of the attention).

Evaluator `glue`: the task's metric on its validation split (`crate_jax.mlm.glue_metrics`): accuracy, F1 (+
accuracy) for MRPC / QQP, Matthews for CoLA, Pearson / Spearman for STS-B.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from crate_jax.models.bert import bert_config, build_bert, train_flops_per_token, with_head
from crate_jax.errors import ConfigError
from crate_jax.parallel.sharding import global_batch
from crate_jax.train.evaluation import jit_on_model, schedule_of
from crate_jax.train.task import TaskBase

# task -> (text features, outputs (1: regression), metrics, validation split): the TFDS `glue` configs.
GLUE: dict[str, tuple[tuple[str, ...], int, tuple[str, ...], str]] = {
    "cola": (("sentence",), 2, ("matthews",), "validation"),
    "sst2": (("sentence",), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}
DATA_KEYS = ("source", "dir", "vocab_dir", "num_threads")


class TextEncoder:
    """Text -> packed `(tokens, mask)` rows with the ids of a prepared token directory."""

    def __init__(self, vocab_dir: str | Path, seq_len: int):
        from tokenizers import Tokenizer

        from crate_jax.data.tokens.loader import TokenDataError, TokenDataset
        from crate_jax.mlm.data import MLMVocab
        try:
            ds = TokenDataset(vocab_dir)
            self.vocab = MLMVocab.of(ds)
            self.tok = Tokenizer.from_file(str(ds.tokenizer_path))
        except TokenDataError as e:
            raise ConfigError(f"config.data.vocab_dir: {e}") from None
        self.seq_len = seq_len

    def row(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        v = self.vocab
        parts = [[i + v.offset for i in self.tok.encode(t, add_special_tokens=False).ids] for t in texts]
        budget = self.seq_len - (2 if len(parts) == 1 else 4)
        while sum(map(len, parts)) > budget:  # longest first, as BERT's `truncate_seq_pair`
            longest = max(parts, key=len)
            longest.pop()
        ids = [v.bos] + parts[0] + [v.eos] + ([v.eos] + parts[1] + [v.eos] if len(parts) > 1 else [])
        tokens = np.full(self.seq_len, v.pad, np.int32)
        tokens[:len(ids)] = ids
        return tokens, (np.arange(self.seq_len) < len(ids)).astype(np.int32)


def read_examples(data: ConfigDict, task: str, split: str) -> list[dict]:
    """The examples of one split: TFDS `glue/<task>` or `<dir>/<split>.jsonl`."""
    if data.get("source", "tfds") == "jsonl":
        path = Path(data.dir) / f"{split}.jsonl"
        if not path.is_file():
            raise ConfigError(f"config.data.dir: no {path} (source='jsonl' reads <dir>/<split>.jsonl)")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import tensorflow_datasets as tfds
    from tensorflow_datasets.text import glue  # noqa: F401 - registers the `glue` builder
    try:
        source = tfds.builder(f"glue/{task}", data_dir=data.get("dir") or None).as_data_source(split=split)
    except Exception as e:  # tfds raises several kinds for a missing or unprepared dataset
        raise ConfigError(f"config.data: cannot open TFDS glue/{task} split {split!r} ({type(e).__name__}: {e}); "
                          f"prepare it with `tfds build glue/{task}` (data_dir={data.get('dir')!r})") from None
    return [source[i] for i in range(len(source))]


def encode_split(examples: list[dict], encoder: TextEncoder, task: str) -> dict[str, np.ndarray]:
    fields, outputs, _, _ = GLUE[task]
    rows = [encoder.row([_text(ex[f]) for f in fields]) for ex in examples]
    label_dtype = np.float32 if outputs == 1 else np.int32
    return {"tokens": np.stack([r[0] for r in rows]), "mask": np.stack([r[1] for r in rows]),
            "label": np.asarray([np.asarray(ex["label"]).item() for ex in examples], label_dtype)}


def _text(x) -> str:
    x = np.asarray(x).item() if not isinstance(x, (str, bytes)) else x
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class GlueTrainIterator:
    """Epochs of a fixed random order (`seed`, epoch), this process's stride of it, batches without remainder;
    the state is `(epoch, position)`, so a resumed run sees the same batches."""

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.pi, self.pc = process_index, process_count
        n = len(arrays["label"]) // process_count
        if n < batch_size:
            raise ConfigError(f"the train split has {len(arrays['label'])} examples, fewer than one batch of "
                              f"{batch_size} per process")
        self.per_epoch = n // batch_size
        self.epoch = self.pos = 0

    def _order(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.arrays["label"]))
        return order[self.pi::self.pc]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pos == self.per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order()[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "n": len(self.arrays["label"]), "seed": self.seed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if (state.get("n"), state.get("seed")) != (len(self.arrays["label"]), self.seed):
            raise ValueError(f"GLUE iterator state of another stream (saved {dict(state)}); resume with the same data "
                             f"and seed")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def stats(self) -> dict[str, float]:
        return {"epoch": self.epoch + self.pos / self.per_epoch}

    def close(self) -> None:
        pass


class GlueTask(TaskBase):
    """`config.task = 'glue'`, `config.glue_task` one of `GLUE`: batches `{'tokens', 'mask': int32 [B, T], 'label'}`."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        self.name = config.get("glue_task")
        if self.name not in GLUE:
            raise ConfigError(f"config.glue_task: got {self.name!r}, expected one of {sorted(GLUE)}")
        data = config.get("data", None) or ConfigDict()
        unknown = sorted(set(data) - set(DATA_KEYS))
        if unknown:
            raise ConfigError(f"config.data: unknown keys {unknown}; known: {list(DATA_KEYS)}")
        if not data.get("vocab_dir"):
            raise ConfigError("config.data.vocab_dir is empty: pass the text_prepare directory whose tokenizer the "
                              "encoder was pretrained with")
        self.seq_len = int(config.seq_len)
        self.encoder = TextEncoder(data.vocab_dir, self.seq_len)
        fields, self.outputs, self.metrics, self.val_split = GLUE[self.name]
        self.model_cfg = self._model_config()
        if self.seq_len > self.model_cfg.max_tokens:
            raise ConfigError(f"config.seq_len {self.seq_len} exceeds the encoder's {self.model_cfg.max_tokens} tokens")
        if self.encoder.vocab.size > self.model_cfg.vocab_size:
            raise ConfigError(f"config.data.vocab_dir: its ids need a vocabulary of {self.encoder.vocab.size}, the "
                              f"encoder has {self.model_cfg.vocab_size}")
        self._arrays: dict[str, dict] = {}

    def _model_config(self):
        m = dict(self.config.get("model", None) or {})
        runtime = {k: m.pop(k) for k in ("dtype", "param_dtype", "dropout", "scan", "remat", "attention") if k in m}
        ckpt = (self.config.get("init", None) or {}).get("checkpoint")
        if ckpt:
            from crate_jax.checkpoint.models import config_of
            from crate_jax.models import registry
            base = config_of(ckpt)
            if registry.kind_of(base) != "bert":
                raise ConfigError(f"config.init.checkpoint {ckpt}: a {registry.kind_of(base)!r} model; GLUE fine-tunes "
                                  f"a CRATE-BERT or BERT encoder (kind 'bert')")
        else:  # from scratch (tests, baselines without pretraining)
            name, variant = m.pop("name", "crate_bert"), m.pop("variant", None)
            base = bert_config(name, variant, vocab_size=self.encoder.vocab.size, pad_token_id=self.encoder.vocab.pad,
                               positions="roberta", max_positions=self.seq_len + self.encoder.vocab.pad + 1,
                               layer_norm_eps=1e-12, **m)
        return with_head(base, num_labels=self.outputs).replace(**runtime)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._arrays:
            self._arrays[split] = encode_split(read_examples(self.config.data, self.name, split), self.encoder, self.name)
        return self._arrays[split]

    def describe(self) -> str:
        c = self.model_cfg
        return f"GLUE {self.name}: {c.model} {c.variant} (width {c.width}, depth {c.depth}) + {c.num_labels}-way head"

    def num_train_examples(self) -> int:
        return len(self.arrays("train")["label"])

    def build_model(self, seed: int):
        return build_bert(self.model_cfg, seed)

    def init_params(self, fresh: dict) -> dict:
        ckpt = (self.config.get("init", None) or {}).get("checkpoint")
        if not ckpt:
            return fresh
        from crate_jax.checkpoint.params import read_params
        from crate_jax.train.pretrained import adapt
        loaded = read_params(ckpt)
        keep_fresh = "classifier/.*" + ("" if "pooler" in loaded else "|pooler/.*")
        return adapt(loaded, fresh, dont_load=keep_fresh)

    def batch_spec(self) -> dict:
        T = self.seq_len
        label = jax.ShapeDtypeStruct((), np.float32 if self.outputs == 1 else np.int32)
        return {"tokens": jax.ShapeDtypeStruct((T,), np.int32), "mask": jax.ShapeDtypeStruct((T,), np.int32),
                "label": label}

    def loss(self, model, batch, rng, extras):
        out = model(batch["tokens"], batch["mask"], train=True, rng=rng).astype(jnp.float32)
        if self.outputs == 1:
            return jnp.mean(jnp.square(out[:, 0] - batch["label"])), {}, None
        nll = jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, batch["label"][:, None], axis=-1)[:, 0]
        acc = jnp.mean((jnp.argmax(out, axis=-1) == batch["label"]).astype(jnp.float32))
        return jnp.mean(nll), {"train/accuracy": acc}, None

    def flops_per_example(self) -> float:
        return float(self.seq_len * train_flops_per_token(self.model_cfg, self.seq_len))

    def tokens_per_example(self) -> int:
        return self.seq_len

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        return GlueTrainIterator(self.arrays("train"), batch_size=batch_size, seed=int(self.config.seed),
                                 process_index=process_index, process_count=process_count)


class GlueEvaluator:
    """`type='glue'`: the task's metrics (and `count`) on `split` (default its validation split)."""

    def __init__(self, name: str, spec: ConfigDict, task, mesh):
        if not isinstance(task, GlueTask):
            raise ConfigError(f"config.evals.{name}: type 'glue' evaluates a GLUE fine-tuning run; this run's task is "
                              f"{type(task).__name__}")
        self.name, self.task, self.mesh = name, task, mesh
        self.every, self.batch_size = schedule_of(name, spec, task, mesh)
        self.split = spec.get("split", None) or task.val_split
        self._fn = None

    def run(self, state) -> dict[str, float]:
        from jax.experimental import multihost_utils

        from crate_jax.mlm.glue_metrics import score
        if self._fn is None:
            self._fn = jit_on_model(state.graphdef, lambda m, b: m(b["tokens"], b["mask"]).astype(jnp.float32))
        a = self.task.arrays(self.split)
        n, bs, pc, pi = len(a["label"]), self.batch_size, jax.process_count(), jax.process_index()
        outs = []
        for start in range(0, n, bs):  # every process builds the same global batch and feeds its rows
            idx = np.arange(start, start + bs) % n
            local = {k: a[k][idx][pi * (bs // pc):(pi + 1) * (bs // pc)] for k in ("tokens", "mask")}
            out = self._fn(state.params, state.buffers, global_batch(local, self.mesh))
            outs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:min(bs, n - start)])
        return {**score(self.task.metrics, np.concatenate(outs), a["label"]), "count": float(n)}
