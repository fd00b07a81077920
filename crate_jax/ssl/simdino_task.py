"""SimDINO self-distillation (Wu et al. 2025, arXiv 2502.10385; official `RobinWu218/SimDINO`,
`simdino/main_dino.py`) as a task of the shared engine (`config.task = 'simdino'`).

* **Student**: a CRATE, CRATE-α or ViT backbone + the DINO projection head to 256, L2-normalised, no
  prototypes, no centring (`crate_jax.models.self_distill`). It sees all views: 2 global crops and
  `n_local` local crops (`crate_jax.data.images.multicrop`), the local ones through a resampled position table.
* **Teacher**: an EMA of the student's parameters, a train-state extra (`extras['teacher']`, sharded like
  the parameters and checkpointed with them). It sees the 2 global crops, without drop-path and without
  gradients. After the optimizer update of step `t` (0-based, `T` total steps):
  `teacher ← m_t · teacher + (1 − m_t) · student`, `m_t = m_end + ½ (m_0 − m_end)(1 + cos(π t / T))`
  (DINO's `cosine_scheduler(0.996, 1, ...)`, per iteration).
* **Loss**: `crate_jax.ssl.simdino_loss.simdino_loss` over the global batch; or, with `loss.name = 'dino'`,
  the classic DINO loss (`crate_jax.ssl.dino_loss`, SimDINO's baseline): the head then ends in DINO's
  weight-normalised prototype layer (`model.prototypes`, `model.norm_last_layer`), the teacher's logits are
  centred by a running centre (`extras['center']`, EMA 0.9 of the teacher's batch means, updated after
  each step) and sharpened by the warmed-up teacher temperature, and the last layer stays frozen for
  `optim.freeze_steps` (set by `configs/simdino.py` to one epoch).

Config keys read here: `model.{name, variant, head_hidden, head_dim, head_layers, prototypes, norm_last_layer,
**ModelConfig overrides}`, `crops.*` (`crate_jax.data.images.multicrop.MultiCropAugment`; `crops.global_size` is
the backbone's resolution), `loss.{name='simdino', eps_sq, gamma, coeff, expa_type, logdet_dtype}` or
`loss.{name='dino', teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, student_temp,
center_momentum, epoch_steps}`, `teacher.{momentum, momentum_end}`, `data.*` (a classification source;
labels are carried for the probes, unused by the loss), `evals` (`knn`, `linear_probe`; `params='teacher'`
probes the teacher).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from crate_jax.data.images.multicrop import MultiCropAugment
from crate_jax.errors import ConfigError
from crate_jax.models.preprocess import normalize
from crate_jax.models.self_distill import build_self_distill, self_distill_config, view_forward_flops
from crate_jax.parallel.sharding import Axes
from crate_jax.ssl import dino_loss as dino
from crate_jax.ssl.simdino_loss import LOGDET_DTYPES, check_conditioning, simdino_loss
from crate_jax.train.task import TaskBase
from crate_jax.train.validate import known_keys, need_choice, need_number

LOSSES = ("simdino", "dino")
LOSS_KEYS = ("name", "eps_sq", "gamma", "coeff", "expa_type", "logdet_dtype")
DINO_LOSS_KEYS = ("name", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "student_temp",
                  "center_momentum", "epoch_steps")
TEACHER_KEYS = ("momentum", "momentum_end")
HEAD_KEYS = ("head_hidden", "head_dim", "head_layers", "prototypes")


def momentum_at(step, total_steps: int, m0: float, m_end: float = 1.0):
    """DINO's per-iteration cosine momentum from `m0` (step 0) towards `m_end`."""
    t = jnp.asarray(step, jnp.float32)
    return m_end + 0.5 * (m0 - m_end) * (1.0 + jnp.cos(math.pi * t / max(1, total_steps)))


class SimDINOTask(TaskBase):
    """`config.task = 'simdino'`: batches `{'global': uint8 [B, 2, G, G, 3], 'local': uint8 [B, n, S, S, 3],
    'label': int32 [B]}`."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        from crate_jax.data.images import loader
        self.loader = loader
        try:
            loader.resolve_config(config.data)
            self.augment = MultiCropAugment(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                               for k, v in dict(config.crops).items()})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.crops / config.data: {e}") from None
        m = dict(config.model)
        if "name" not in m or "variant" not in m:
            raise ConfigError(f"config.model needs 'name' (crate | crate_alpha | vit) and 'variant'; got {sorted(m)}")
        name, variant = m.pop("name"), m.pop("variant")
        head = {k: int(m.pop(k)) for k in HEAD_KEYS if k in m}
        if "norm_last_layer" in m:
            head["norm_last_layer"] = bool(m.pop("norm_last_layer"))
        m.pop("num_classes", None)
        self.model_cfg = self_distill_config(name, variant, image_size=self.augment.global_size, **head, **m)
        if self.augment.local_size % self.model_cfg.backbone.patch_size:
            raise ConfigError(f"config.crops.local_size {self.augment.local_size} is not divisible by the patch size "
                              f"{self.model_cfg.backbone.patch_size}")
        need_choice(config, "loss.name", LOSSES, optional=True)
        self.loss_name = config.loss.get("name", "simdino")
        if (self.loss_name == "dino") != bool(self.model_cfg.prototypes):
            raise ConfigError(f"config.loss.name={self.loss_name!r} needs "
                              f"{'model.prototypes > 0 (the DINO head)' if self.loss_name == 'dino' else 'model.prototypes = 0'}")
        self.m0 = float(config.teacher.get("momentum", 0.996))
        self.m_end = float(config.teacher.get("momentum_end", 1.0))
        known_keys(config.teacher, "teacher", TEACHER_KEYS)
        need_number(config, "teacher.momentum", lo=0, hi=1)
        need_number(config, "teacher.momentum_end", lo=0, hi=1, optional=True)
        if self.loss_name == "dino":
            self._dino_config(config)
            return
        known_keys(config.loss, "loss", LOSS_KEYS)
        need_number(config, "loss.eps_sq", lo=0, lo_open=True, what=" (the official --eps, used as ε²)")
        need_number(config, "loss.gamma", lo=0, optional=True, what=" (None: the official (p + M)/(p M))")
        need_number(config, "loss.coeff", lo=0, optional=True)
        need_choice(config, "loss.expa_type", (0, 1), optional=True)
        need_choice(config, "loss.logdet_dtype", LOGDET_DTYPES, optional=True)
        known_keys(config.teacher, "teacher", TEACHER_KEYS)
        need_number(config, "teacher.momentum", lo=0, hi=1)
        need_number(config, "teacher.momentum_end", lo=0, hi=1, optional=True)
        self.loss_cfg = dict(eps_sq=float(config.loss.eps_sq), gamma=config.loss.get("gamma", None),
                             coeff=float(config.loss.get("coeff", 1.0)), expa_type=int(config.loss.get("expa_type", 1)),
                             logdet_dtype=config.loss.get("logdet_dtype", "float32"))
        try:
            check_conditioning(self.model_cfg.head_dim, self.loss_cfg["eps_sq"], self.loss_cfg["logdet_dtype"])
        except ValueError as e:
            raise ConfigError(f"config.loss.eps_sq: {e}") from None

    def _dino_config(self, config):
        known_keys(config.loss, "loss", DINO_LOSS_KEYS)
        for key in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            need_number(config, f"loss.{key}", lo=0, lo_open=True)
        need_number(config, "loss.center_momentum", lo=0, hi=1)
        for key in ("warmup_teacher_temp_epochs", "epoch_steps"):
            v = config.loss.get(key, 0)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"config.loss.{key}: expected an integer >= 0, got {v!r}")
        self.dino_cfg = {k: config.loss[k] for k in DINO_LOSS_KEYS if k != "name"}

    def describe(self) -> str:
        b, a = self.model_cfg.backbone, self.augment
        views = (f"{b.model} {b.variant}: 2 global crops @ {a.global_size}px + {a.n_local} local @ {a.local_size}px, "
                 f"head → {self.model_cfg.head_dim}")
        if self.loss_name == "dino":
            d = self.dino_cfg
            return (f"DINO {views} → {self.model_cfg.prototypes} prototypes, teacher τ {d['warmup_teacher_temp']} → "
                    f"{d['teacher_temp']}, student τ {d['student_temp']}, EMA teacher {self.m0} → {self.m_end}")
        return f"SimDINO {views}, ε² {self.loss_cfg['eps_sq']}, EMA teacher {self.m0} → {self.m_end}"

    def epoch_steps(self) -> int:
        """Steps per epoch for the per-epoch teacher-temperature warm-up: `loss.epoch_steps`, else the train
        split's size over the global batch (DINO drops the last partial batch)."""
        if getattr(self, "_epoch_steps", None) is None:
            n = int(self.dino_cfg.get("epoch_steps") or 0)
            self._epoch_steps = n or max(1, self.num_train_examples() // int(self.config.batch_size))
        return self._epoch_steps

    def num_train_examples(self) -> int:
        return self.loader.num_examples(self.config.data, self.config.data.train_split)

    def build_model(self, seed: int):
        return build_self_distill(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        a = self.augment
        return {"global": jax.ShapeDtypeStruct((2, a.global_size, a.global_size, 3), np.uint8),
                "local": jax.ShapeDtypeStruct((a.n_local, a.local_size, a.local_size, 3), np.uint8),
                "label": jax.ShapeDtypeStruct((), np.int32)}

    @staticmethod
    def _views(model, views, **kw):
        """`[B, V, S, S, 3]` uint8 -> head outputs `[V, B, p]`."""
        B, V = views.shape[:2]
        z = model(normalize(views).reshape((B * V,) + views.shape[2:]), **kw)
        return jnp.swapaxes(z.reshape(B, V, -1), 0, 1)

    def loss(self, model, batch, rng, extras):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(extras["teacher"]), rest)
        k_global, k_local = jax.random.split(rng)
        student = [self._views(model, batch["global"], train=True, rng=k_global)]
        if self.augment.n_local:
            student.append(self._views(model, batch["local"], train=True, rng=k_local))
        t = self._views(teacher, batch["global"])
        if self.loss_name == "dino":
            d = self.dino_cfg
            temp = dino.teacher_temp_at(extras["step"], warmup_temp=float(d["warmup_teacher_temp"]),
                                        temp=float(d["teacher_temp"]),
                                        warmup_epochs=int(d["warmup_teacher_temp_epochs"]),
                                        epoch_steps=self.epoch_steps())
            loss, m, center = dino.dino_loss(jnp.concatenate(student, axis=0), t, extras["center"],
                                             teacher_temp=temp, student_temp=float(d["student_temp"]))
            return loss, {f"train/{k}": v for k, v in m.items()}, {"center": center}
        loss, m = simdino_loss(jnp.concatenate(student, axis=0), t, **self.loss_cfg)
        return loss, {f"train/{k}": v for k, v in m.items()}, None

    def init_extras(self, params: dict) -> dict:
        extras = {"teacher": params}  # the teacher starts as the student (the engine copies the buffers)
        if self.loss_name == "dino":
            # the centre, and the step (the temperature schedule is per epoch; the loss does not see the step)
            extras.update(center=jnp.zeros((self.model_cfg.prototypes,), jnp.float32), step=jnp.zeros((), jnp.int32))
        return extras

    def extras_axes(self, param_axes: dict) -> dict:
        axes = {"teacher": param_axes}
        if self.loss_name == "dino":
            axes.update(center=Axes.replicated(1), step=Axes.replicated(0))
        return axes

    def update_extras(self, extras: dict, params: dict, step, aux) -> dict:
        m = momentum_at(step, self.total_steps, self.m0, self.m_end)
        out = {"teacher": jax.tree.map(lambda t, p: (m * t + (1.0 - m) * p).astype(t.dtype), extras["teacher"],
                                       params)}
        if self.loss_name == "dino":
            out["center"] = dino.update_center(extras["center"], aux["center"], float(self.dino_cfg["center_momentum"]))
            out["step"] = jnp.asarray(step, jnp.int32) + 1
        return out

    def flops_per_example(self) -> float:
        a, c = self.augment, self.model_cfg
        student = 2 * view_forward_flops(c, a.global_size) + a.n_local * view_forward_flops(c, a.local_size)
        return float(3 * student + 2 * view_forward_flops(c, a.global_size))

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        from crate_jax.data.images import multicrop
        return multicrop.make_train_iterator(self.config.data, self.augment, batch_size=batch_size,
                                             seed=self.config.seed, process_index=process_index,
                                             process_count=process_count)
