"""CRATE-MAE masked autoencoding (docs/math.md §CRATE-MAE) as a task of the shared engine (`config.task = 'mae'`).

Each step draws the official per-sample noise-argsort masks (`mask_ratio`, 0.75) from the step key
(`crate_jax.models.masking.mae_random_mask`; the step key is `fold_in(seed, step)`, so a resumed run
draws the same masks), runs the encoder on the full-length sequence with mask tokens and the decoder,
and takes the MSE on the removed patches (optionally `norm_pix_loss`) against the normalised image.

Config keys read here: `res`, `seed`, `model.{variant, **MAEConfig overrides}` (e.g. `width`, `depth`,
`num_heads`, `patch_size`, `mask_ratio`, `norm_pix_loss`, `dtype`, `scan`, `remat`), `data.*` (any
classification source, `crate_jax.data.images.classification`; its labels are carried but unused), `init.*`,
and the evaluators in `evals` (e.g. `knn`, `linear_probe` on the encoder's cls token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from crate_jax.errors import ConfigError
from crate_jax.models.mae import MAEConfig, build_mae, mae_config, mae_forward_flops, mae_loss
from crate_jax.models.masking import mae_random_mask
from crate_jax.models.preprocess import normalize
from crate_jax.train.task import TaskBase


def mae_config_from(config: ConfigDict) -> MAEConfig:
    m = dict(config.get("model", None) or {})
    variant = m.pop("variant", None)
    m.pop("name", None)
    if not variant:
        raise ConfigError(f"config.model.variant: the CRATE-MAE size, e.g. 'B/16' (T, S, B, L); got keys {sorted(m)}")
    res = config.get("res")
    if "image_size" not in m:
        if not isinstance(res, int) or isinstance(res, bool):
            raise ConfigError(f"config.res: expected the image size in pixels (an integer), got {res!r}")
        m["image_size"] = res
    return mae_config(variant, **m)


class MAETask(TaskBase):
    """`config.task = 'mae'`: batches `{'image': uint8 [B, S, S, 3], 'label': int32 [B]}`."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        from crate_jax.data.images import loader
        self.loader = loader
        self.model_cfg = mae_config_from(config)
        try:
            loader.resolve_config(config.data)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def describe(self) -> str:
        c = self.model_cfg
        return (f"CRATE-MAE {c.variant} @ {c.image_size}px (width {c.width}, depth {c.depth}/"
                f"{c.decoder_depth or c.depth}), mask ratio {c.mask_ratio}, norm_pix_loss {c.norm_pix_loss}")

    def num_train_examples(self) -> int:
        return self.loader.num_examples(self.config.data, self.config.data.train_split)

    def build_model(self, seed: int):
        return build_mae(self.model_cfg, seed)

    def batch_spec(self) -> dict:
        s = self.model_cfg.image_size
        return {"image": jax.ShapeDtypeStruct((s, s, 3), np.uint8), "label": jax.ShapeDtypeStruct((), np.int32)}

    def loss(self, model, batch, rng, extras):
        c = self.model_cfg
        images = normalize(batch["image"])
        mask = mae_random_mask(rng, images.shape[0], c.num_patches, c.mask_ratio)
        pred = model(images, mask, train=True)
        loss = mae_loss(pred, images, mask, patch=c.patch_size, norm_pix_loss=c.norm_pix_loss)
        return loss, {"train/removed_fraction": jnp.mean(mask.astype(jnp.float32))}, None

    def flops_per_example(self) -> float:
        return float(3 * mae_forward_flops(self.model_cfg))

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int):
        return self.loader.make_train_iterator(self.config.data, batch_size=batch_size,
                                               image_size=self.model_cfg.image_size, seed=self.config.seed,
                                               process_index=process_index, process_count=process_count)
