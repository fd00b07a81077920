"""Supervised image classification: the task (model, label-smoothed / mixed-up cross-entropy, data); its
evaluator is `crate_jax.classify.evaluators`.

Config keys read here: `res`, `seed`, `model.{name, variant, **ModelConfig overrides}`,
`loss.{label_smoothing, on_value, off_value, mixup}`, `data.*` (`crate_jax.data.images.classification`),
`init.{checkpoint, dont_load, posemb_resample}`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from crate_jax.classify.mixup import mixup_cutmix
from crate_jax.models import ModelConfig, build_model, model_config
from crate_jax.errors import ConfigError
from crate_jax.models.flops import train_flops
from crate_jax.models.preprocess import normalize
from crate_jax.train.task import TaskBase
from crate_jax.train.validate import known_keys, need_number


class ClassCountUnavailable(ConfigError):
    """`config.model.num_classes` is unset and the data could not be read to count the classes."""


def model_config_from(config: ConfigDict, num_classes: int) -> ModelConfig:
    """`config.model` = {name, variant, **ModelConfig overrides}; image size from `config.res`."""
    m = dict(config.get("model", None) or {})
    if "name" not in m or "variant" not in m:
        raise ConfigError(f"config.model needs 'name' (crate | crate_alpha | vit) and 'variant' (e.g. 'B/16'); "
                          f"got keys {sorted(m)}")
    name, variant = m.pop("name"), m.pop("variant")
    if "image_size" not in m:
        if not isinstance(config.get("res"), int) or isinstance(config.get("res"), bool):
            raise ConfigError(f"config.res: expected the image size in pixels (an integer), got {config.get('res')!r}")
        m["image_size"] = config.res
    if m.get("num_classes") is None:
        m["num_classes"] = num_classes
    known = ModelConfig.keys()
    unknown = sorted(set(m) - known)
    if unknown:
        raise ConfigError(f"config.model.{unknown[0]}: unknown model config key{'s ' + str(unknown) if len(unknown) > 1 else ''}"
                          f"; known keys are {sorted(known - {'model', 'variant'})}")
    try:
        return model_config(name, variant, **m)
    except ConfigError as e:
        res = "" if "image_size" in dict(config.model) else f" (image size config.res = {config.res})"
        raise ConfigError(f"config.model{res}: {e}") from None


LOSS_KEYS = ("label_smoothing", "on_value", "off_value", "mixup")
MIXUP_KEYS = ("enabled", "mixup_alpha", "cutmix_alpha", "switch_prob")


def validate_loss(config: ConfigDict) -> None:
    """`config.loss`: label smoothing in [0, 1), explicit on/off values together, mixup parameters."""
    loss = config.get("loss", None)
    if loss is None:
        raise ConfigError("config.loss is missing (label_smoothing, on_value / off_value, mixup)")
    known_keys(loss, "loss", LOSS_KEYS)
    need_number(config, "loss.label_smoothing", lo=0, hi=1, hi_open=True, optional=True)
    if (loss.get("on_value") is None) != (loss.get("off_value") is None):
        raise ConfigError("config.loss.on_value and off_value go together (big_vision one-hot values); set both or "
                          "neither")
    if loss.get("on_value") is not None:
        need_number(config, "loss.on_value", lo=0, hi=1)
        need_number(config, "loss.off_value", lo=0, hi=1)
    mix = loss.get("mixup", None)
    if mix is not None:
        known_keys(mix, "loss.mixup", MIXUP_KEYS)
        for key in ("mixup_alpha", "cutmix_alpha"):
            need_number(config, f"loss.mixup.{key}", lo=0, optional=True)
        need_number(config, "loss.mixup.switch_prob", lo=0, hi=1, optional=True)


def soft_labels(labels, num_classes: int, on: float, off: float):
    return jax.nn.one_hot(labels, num_classes) * (on - off) + off


def label_values(config: ConfigDict, num_classes: int) -> tuple[float, float]:
    """(on, off) one-hot values: explicit `loss.on/off` (big_vision style) or from `label_smoothing`."""
    loss = config.loss
    if loss.get("on_value") is not None:
        return float(loss.on_value), float(loss.off_value)
    eps = float(loss.get("label_smoothing", 0.0))
    return 1.0 - eps + eps / num_classes, eps / num_classes


class ClassificationTask(TaskBase):
    """`config.task = 'classification'`: batches `{'image': uint8 [B, S, S, 3], 'label': int32 [B]}`."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        from crate_jax.data.images import loader
        self.loader = loader
        validate_loss(config)
        try:
            loader.resolve_config(config.data)
        except ValueError as e:  # the data config's own checks name the key
            raise ConfigError(str(e)) from None
        # The class count comes from the model config when it is set, so building the model (AOT, benches)
        # never has to open the dataset; otherwise from the dataset.
        n = config.model.get("num_classes")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"config.model.num_classes: expected an integer >= 1 (or unset: read from the data), "
                              f"got {n!r}")
        if n is None:
            try:
                n = loader.num_classes(config.data)
            except ValueError as e:  # e.g. a TFDS dataset that is not prepared: the message says where
                raise ClassCountUnavailable(f"config.model.num_classes is unset, so the class count is read "
                                            f"from config.data, which failed: {e}") from None
        self.num_classes = int(n)
        self.model_cfg = model_config_from(config, self.num_classes)
        self.on, self.off = label_values(config, self.num_classes)

    def describe(self) -> str:
        c = self.model_cfg
        return f"{c.model} {c.variant} @ {c.image_size}px, {self.num_classes} classes"

    def num_train_examples(self) -> int:
        return self.loader.num_examples(self.config.data, self.config.data.train_split)

    def build_model(self, seed: int):
        return build_model(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        s = self.model_cfg.image_size
        return {"image": jax.ShapeDtypeStruct((s, s, 3), np.uint8), "label": jax.ShapeDtypeStruct((), np.int32)}

    def loss(self, model, batch, rng, extras):
        """Softmax cross-entropy on (mixed) soft labels."""
        k_mix, k_model = jax.random.split(rng)
        images = normalize(batch["image"])
        labels = soft_labels(batch["label"], self.num_classes, self.on, self.off)
        mix = self.config.loss.get("mixup", None)
        if mix is not None and mix.get("enabled", False):
            images, labels = mixup_cutmix(k_mix, images, labels, mixup_alpha=mix.mixup_alpha,
                                          cutmix_alpha=mix.cutmix_alpha, switch_prob=mix.switch_prob)
        logits = model(images, train=True, rng=k_model).astype(jnp.float32)
        loss = -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1).mean()
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"train/top1": top1}, None

    def flops_per_example(self) -> float:
        return float(train_flops(self.model_cfg))

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        return self.loader.make_train_iterator(self.config.data, batch_size=batch_size,
                                               image_size=self.model_cfg.image_size, seed=self.config.seed,
                                               process_index=process_index, process_count=process_count)
