"""CLIPA image-text training as a task of the shared engine (`crate_jax.train.loop`).

The task supplies the two-tower model, the global-batch contrastive loss, the caption data
(webdataset shards or a TFDS directory, tokenised with the BERT WordPiece tokenizer) and the
initialisation from an earlier checkpoint (pre-training from a two-tower checkpoint whose text
tower stays frozen; fine-tuning at a higher resolution with the image position embedding
resampled). Its evaluators (`crate_jax.clip.zeroshot`) are zero-shot classification and retrieval.

Config keys read here (see `configs/clipa.py` for the values of the recipes):
  res, txt_len, batch_size, total_steps, seed, optim.freeze, init.{checkpoint, dont_load,
  posemb_resample}, model.{image, text, out_dim, loss, mask_ratio, temperature_init},
  data.{source, shards, tfds_dir, tfds_split, vocab, shuffle_buffer, cycle_length, area_min,
  area_max, num_threads, prefetch, fast_decode}, and the evaluators in `evals` (types 'zeroshot'
  and 'retrieval', see `crate_jax.clip.zeroshot`).

With `microbatches > 1` the contrastive loss is computed within each microbatch (a smaller
contrastive batch), not over the whole global batch.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from crate_jax.clip import loss as loss_lib
from crate_jax.errors import ConfigError
from crate_jax.models.flops import block_flops
from crate_jax.models.preprocess import normalize
from crate_jax.models.text import text_config
from crate_jax.models.two_tower import TwoTowerConfig, build_two_tower, two_tower_config
from crate_jax.train import metrics as M
from crate_jax.train.optim import path_str
from crate_jax.train.task import TaskBase
from crate_jax.train.validate import known_keys, need_choice, need_int, need_number

DATA_SOURCES = ("shards", "tfds")
DATA_KEYS = ("source", "shards", "tfds_dir", "tfds_split", "vocab", "shuffle_buffer", "cycle_length", "area_min",
             "area_max", "num_threads", "prefetch", "fast_decode")


def two_tower_config_from(config: ConfigDict) -> TwoTowerConfig:
    """`config.model` (+ `res`, `txt_len`) -> `TwoTowerConfig`."""
    m = config.model
    img = dict(m.image)
    name, variant = img.pop("name"), img.pop("variant")
    text = dict(m.text)
    tvariant, tmodel = text.pop("variant"), text.pop("model", "transformer")
    text["max_len"] = int(config.txt_len)
    kw = {}
    if m.get("temperature_init"):
        kw["temperature_init"] = float(m.temperature_init)
    return two_tower_config(name, variant, image_size=int(config.res), text=text_config(tvariant, tmodel, **text),
                            out_dim=int(m.out_dim) if m.get("out_dim") else None, loss=m.get("loss", "softmax"),
                            mask_ratio=float(m.get("mask_ratio", 0.0)), image_overrides=img, **kw)


def _local_copy(path: str) -> str:
    """A local path for `path` (remote files such as `gs://…/vocab.txt` are copied once via fsspec)."""
    if "://" not in path or path.startswith("file://"):
        return path[len("file://"):] if path.startswith("file://") else path
    import fsspec
    local = os.path.join(tempfile.gettempdir(), "crate_jax_" + re.sub(r"[^A-Za-z0-9_.-]", "_", path))
    if not os.path.exists(local):
        with fsspec.open(path, "rb") as src, open(local + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(local + ".tmp", local)
    return local


class ClipTask(TaskBase):
    """`config.task = 'clip'`: batches `{'image': uint8 [B, S, S, 3], 'text': int32 [B, L]}`."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        need_int(config, "res", 1, what=" (the image size in pixels)")
        need_int(config, "txt_len", 1, what=" (caption length in tokens)")
        try:
            self.model_cfg = two_tower_config_from(config)
        except ConfigError as e:
            raise ConfigError(f"config.model (image size config.res = {config.res}, text length config.txt_len = "
                              f"{config.txt_len}): {e}") from None
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config.model: expected image = dict(name, variant, ...), text = dict(variant, ...): "
                              f"{type(e).__name__}: {e}") from None
        if not config.get("total_steps"):
            raise ConfigError("config.total_steps must be set for CLIP training (steps=N in configs/clipa.py)")
        self.mesh = None  # set by validate(); the loss computes each device's rows on it
        self._tokenizer = None
        self._embedders: dict = {}  # (graphdef id, batch) -> zeroshot.Embedder, compiled once
        freeze = [re.compile(f) for f in (config.optim.get("freeze", []) or [])]
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_two_tower(self.model_cfg, 0)), nnx.Param)))]
        frozen = {p for p in paths if any(r.fullmatch(p) for r in freeze)}
        txt = [p for p in paths if p.startswith("txt/")]
        self.text_frozen = bool(txt) and all(p in frozen for p in txt)
        self.t_frozen = "t" in frozen

    # ------------------------------------------------------------------------------ set-up
    def describe(self) -> str:
        c = self.model_cfg
        frozen = [n for n, f in (("text tower", self.text_frozen), ("t", self.t_frozen)) if f]
        return (f"CLIP {c.image.model} {c.image.variant} @ {c.image.image_size}px + text {c.text.model} "
                f"{c.text.variant} ({c.text.max_len} tokens), {c.loss} loss, out_dim {c.out_dim}"
                + (f", mask_ratio {c.mask_ratio}" if c.mask_ratio else "")
                + (f", frozen: {' and '.join(frozen)}" if frozen else ""))

    def validate(self, mesh) -> None:
        self.mesh = mesh
        c, data = self.config, self.config.data
        known_keys(data, "data", DATA_KEYS)
        need_choice(c, "data.source", DATA_SOURCES)
        need_int(c, "data.shuffle_buffer", 1, optional=True)
        need_int(c, "data.cycle_length", 1, optional=True)
        need_int(c, "data.num_threads", 1, optional=True)
        need_int(c, "data.prefetch", 0, optional=True)
        need_number(c, "data.area_min", lo=0, hi=100, lo_open=True, optional=True, what=" (percent of the image)")
        need_number(c, "data.area_max", lo=float(data.get("area_min", 40.0) or 0), hi=100, optional=True,
                    what=" (percent, >= data.area_min)")
        if data.source == "shards" and not data.get("shards"):
            raise ConfigError("config.data.shards is empty: pass shards=PATTERN, e.g. "
                              "'gs://bucket/datacomp/{00000..12799}.tar'")
        if data.source == "tfds" and not data.get("tfds_dir"):
            raise ConfigError("config.data.tfds_dir is empty: pass tfds=DIR, the TFDS builder directory "
                              "(with dataset_info.json) holding 'jpg' and 'txt' features")
        self.tokenizer  # the vocab file exists and fits the text embedding
        init = self.config.get("init", None)
        if (not init or not init.get("checkpoint")) and self.text_frozen:
            raise ConfigError("the text tower is frozen (config.optim.freeze) but config.init.checkpoint is "
                              "unset, so it would stay at its random init: pass init=PATH (a two-tower bundle, "
                              "e.g. from `crate_jax.convert --format clipa-jax`, or a CLIP training workdir) or "
                              "freeze_text=False")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from crate_jax.text.tokenizer import Tokenizer
            vocab = self.config.data.get("vocab")
            if not vocab:
                raise ConfigError("config.data.vocab is empty: pass vocab=FILE (a BERT-layout vocab.txt, "
                                  "e.g. BERT uncased_L-12_H-768_A-12/vocab.txt; docs/clipa.md §Recipes)")
            local = _local_copy(str(vocab))
            if not os.path.isfile(local):
                raise ConfigError(f"config.data.vocab: {vocab} does not exist (expected a BERT vocab.txt)")
            tok = Tokenizer(local, max_len=self.model_cfg.text.max_len)
            if tok.vocab_size > self.model_cfg.text.vocab_size:
                raise ConfigError(f"vocab {vocab} has {tok.vocab_size} entries but the text embedding has only "
                                  f"{self.model_cfg.text.vocab_size} rows; raise model.text.vocab_size")
            self._tokenizer = tok
        return self._tokenizer

    def build_model(self, seed: int):
        return build_two_tower(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        s, n = self.model_cfg.image.image_size, self.model_cfg.text.max_len
        return {"image": jax.ShapeDtypeStruct((s, s, 3), np.uint8), "text": jax.ShapeDtypeStruct((n,), np.int32)}

    def flops_per_example(self) -> float:
        """Image tower forward+backward (3×, on the kept tokens), text tower 3× or 1× when frozen, and
        the `[B, B]` logits of both directions."""
        c = self.model_cfg
        img = c.image
        n = max(1, int(img.num_patches * (1.0 - c.mask_ratio)))
        img_fwd = (2 * img.num_patches * img.patch_size ** 2 * img.channels * img.width
                   + img.depth * block_flops(img.block, n + 1) + 2 * img.width * c.out_dim)
        txt_fwd = c.text.depth * block_flops(c.text.block, c.text.max_len) + 2 * c.text.width * c.out_dim
        logits = 2 * 2 * int(self.config.batch_size) * c.out_dim
        return float(3 * img_fwd + (1 if self.text_frozen else 3) * txt_fwd + 3 * logits)

    # ------------------------------------------------------------------------------ training
    def loss(self, model, batch, rng, extras):
        """Global-batch contrastive (or sigmoid) loss."""
        k_img, k_txt = jax.random.split(rng)
        zimg = model.encode_image(normalize(batch["image"]), train=True, rng=k_img)
        ztxt = model.encode_text(batch["text"], train=True, rng=k_txt)
        lp = model.logit_params()
        t, b = lp["t"], lp["b"]
        if self.text_frozen:  # no backward pass through a frozen tower
            ztxt = jax.lax.stop_gradient(ztxt)
        if self.t_frozen:
            t = jax.lax.stop_gradient(t)
        if self.model_cfg.loss == "sigmoid":
            loss, m = loss_lib.sigmoid_loss(zimg, ztxt, t, b, mesh=self.mesh)
        else:
            loss, m = loss_lib.contrastive_loss(zimg, ztxt, t, mesh=self.mesh)
        metrics = {f"train/{k}": v for k, v in m.items()}
        metrics["train/t"] = t
        if b is not None:
            metrics["train/b"] = b
        return loss, metrics, None

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        d = self.config.data
        common = dict(batch_size=batch_size, image_size=self.model_cfg.image.image_size,
                      tokenizer=self.tokenizer, seed=int(self.config.seed), process_index=process_index,
                      process_count=process_count, area_min=float(d.get("area_min", 40.0)),
                      area_max=float(d.get("area_max", 100.0)), num_threads=d.get("num_threads") or None,
                      prefetch=int(d.get("prefetch", 2)), fast_decode=bool(d.get("fast_decode", False)))
        if d.source == "shards":  # validate() checked that the pattern / directory is set
            from crate_jax.data.image_text import shard_train
            return shard_train.make_train_iterator(d.shards, shuffle_buffer=int(d.get("shuffle_buffer", 10_000)),
                                                   cycle_length=int(d.get("cycle_length", 4)), **common)
        from crate_jax.data.image_text import tfds_captions
        return tfds_captions.make_train_iterator(d.tfds_dir, split=d.get("tfds_split", "train"), **common)

    def init_params(self, fresh: dict) -> dict:
        """`config.init.checkpoint` (a bundle or a training workdir) merged into `fresh`: names matching
        `init.dont_load` keep their fresh values, the image position embedding is resampled
        (`init.posemb_resample`, CLIPA: '1d'), a text position embedding of another length is
        resampled along its token axis."""
        from crate_jax.checkpoint.params import read_params
        from crate_jax.models import posemb
        from crate_jax.train.pretrained import adapt
        init = self.config.init
        loaded = read_params(init.checkpoint)
        pos = loaded.get("txt", {}).get("pos_embedding") if isinstance(loaded.get("txt"), dict) else None
        want = fresh["txt"]["pos_embedding"].shape
        if pos is not None and pos.shape != want and pos.ndim == 3:
            loaded["txt"]["pos_embedding"] = posemb.resample_1d(pos, want[1])
        params = adapt(loaded, fresh, dont_load=init.get("dont_load", None) or None,
                       posemb_mode=init.get("posemb_resample", "1d"))
        M.console(f"initialised from {init.checkpoint} (fresh: {init.get('dont_load', None) or 'nothing'}; "
                  f"posemb resample {init.get('posemb_resample', '1d')})")
        return params

    # ------------------------------------------------------------------------------ evaluation
    def eval_iterator(self, spec: ConfigDict, *, with_text: bool, batch: int):
        """One pass over an evaluator's data (`source` 'shards' or 'tfds'), this process's share,
        `batch` rows per process."""
        res = self.model_cfg.image.image_size
        pi, pc = jax.process_index(), jax.process_count()
        source = spec.get("source", "shards")
        if source == "shards":
            from crate_jax.data.image_text import shard_eval
            return shard_eval.make_eval_iterator(spec.shards, batch_size=batch, image_size=res,
                                                 tokenizer=self.tokenizer if with_text else None, process_index=pi,
                                                 process_count=pc,
                                                 label_key=None if with_text else spec.get("label_key", "label"))
        from crate_jax.data.images import loader
        data = ConfigDict(dict(source="tfds", name=spec.name, data_dir=spec.get("data_dir", None),
                               eval_split=spec.get("split", "validation"), augment="inception_crop",
                               resize_small=res, flip=False, num_threads=int(spec.get("num_threads", 8)),
                               tfds_decoder=spec.get("decoder", "pil")))
        return loader.make_eval_iterator(data, batch_size=batch, image_size=res, process_index=pi, process_count=pc)

    def embedder(self, state, global_batch: int):
        """The jitted, mesh-sharded encoders (`crate_jax.clip.zeroshot.Embedder`) bound to `state`'s
        parameters; compiled once per graph and batch size, shared by all evaluators."""
        from crate_jax.clip.zeroshot import Embedder
        key = (id(state.graphdef), int(global_batch))
        if key not in self._embedders:
            self._embedders[key] = Embedder(state.graphdef, state.mesh, global_batch)
        return self._embedders[key].bind(state.params, state.buffers)
