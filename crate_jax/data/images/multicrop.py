"""DINO multi-crop views for self-distillation (SimDINO `main_dino.py::DataAugmentationDINO`).

Per image: 2 global views and `n_local` local views, each an Inception crop (`crops.inception_crop`, the
one crop of the package: TF's `sample_distorted_bounding_box` box, aspect 3/4..4/3, bilinear resize)
of an area fraction in `global_scale` / `local_scale`, then

* horizontal flip (p 0.5);
* colour jitter with probability 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, the four in
  a random order (torchvision `ColorJitter`; factors uniform in [1 − x, 1 + x], the hue shift in [−h, h]);
* grayscale (p 0.2);
* Gaussian blur, PIL radius uniform in `blur_radius` (0.1, 2.0), with probability 1.0 on the first
  global view, 0.1 on the second and 0.5 on each local view;
* solarisation (threshold 128) with probability 0.2 on the second global view only.

Differences from the official pipeline, all small: torchvision's `RandomResizedCrop` draws its box
slightly differently from TF's, and resizes bicubic (here bilinear with PIL's antialiasing); torchvision's
contrast blends towards the grayscale mean, PIL's `ImageEnhance.Contrast` likewise (rounding differs).

Elements are `{'global': uint8 [2, G, G, 3], 'local': uint8 [n_local, S, S, 3], 'label': int32}`; the
generator of an element depends only on the seed and its global position (grain `random_map`), so a
resumed stream reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from crate_jax.data.crops import inception_crop
from crate_jax.data.decode import decode_record, to_array
from crate_jax.data.images import classification
from crate_jax.data.images.loader import TrainIterator, resolve_config, to_iter_dataset, train_stream


@dataclasses.dataclass(frozen=True)
class MultiCropAugment:
    """The DINO view recipe; every field is a config field of `crops` in `configs/simdino.py`."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    flip: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, each local view
    blur_radius: tuple[float, float] = (0.1, 2.0)
    solarize_probs: tuple[float, float, float] = (0.0, 0.2, 0.0)

    def __post_init__(self):
        for name in ("global_scale", "local_scale", "blur_radius"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name != "blur_radius" and hi > 1):
                raise ValueError(f"crops.{name}: expected 0 < low <= high{' <= 1' if name != 'blur_radius' else ''}, "
                                 f"got {(lo, hi)}")
        for name in ("jitter_prob", "grayscale_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"crops.{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        for name in ("blur_probs", "solarize_probs"):
            v = getattr(self, name)
            if len(v) != 3 or not all(0 <= p <= 1 for p in v):
                raise ValueError(f"crops.{name}: expected 3 probabilities (global 1, global 2, local), got {v}")
        if self.global_size < 1 or self.local_size < 1 or self.n_local < 0:
            raise ValueError(f"crops: sizes must be >= 1 and n_local >= 0, got {self.global_size}, {self.local_size}, "
                             f"{self.n_local}")

    def _colour(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.jitter_prob:
            for op in rng.permutation(4):
                if op == 0 and self.brightness:
                    img = ImageEnhance.Brightness(img).enhance(rng.uniform(max(0, 1 - self.brightness), 1 + self.brightness))
                elif op == 1 and self.contrast:
                    img = ImageEnhance.Contrast(img).enhance(rng.uniform(max(0, 1 - self.contrast), 1 + self.contrast))
                elif op == 2 and self.saturation:
                    img = ImageEnhance.Color(img).enhance(rng.uniform(max(0, 1 - self.saturation), 1 + self.saturation))
                elif op == 3 and self.hue:
                    img = _shift_hue(img, rng.uniform(-self.hue, self.hue))
        if rng.random() < self.grayscale_prob:
            img = img.convert("L").convert("RGB")
        return img

    def view(self, img: Image.Image, rng: np.random.Generator, size: int, scale, blur_p: float,
             solarize_p: float) -> np.ndarray:
        out = inception_crop(img, rng, size, scale[0], scale[1])
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = self._colour(out, rng)
        if rng.random() < blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
        if rng.random() < solarize_p:
            out = ImageOps.solarize(out, 128)
        return to_array(out)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
        g = [self.view(img, rng, self.global_size, self.global_scale, self.blur_probs[i], self.solarize_probs[i])
             for i in range(2)]
        loc = [self.view(img, rng, self.local_size, self.local_scale, self.blur_probs[2], self.solarize_probs[2])
               for _ in range(self.n_local)]
        empty = np.zeros((0, self.local_size, self.local_size, 3), np.uint8)
        return {"global": np.stack(g), "local": np.stack(loc) if loc else empty}


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision `adjust_hue`: rotate the hue channel by `shift` of a full turn."""
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda x: (x + int(round(shift * 255))) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


@dataclasses.dataclass(frozen=True)
class MultiCropTransform:
    """Record -> `{'global', 'local', 'label'}` (or the loader's bad-element marker)."""

    augment: MultiCropAugment

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        img, bad = decode_record(record)
        if bad is not None:
            return bad
        return {**self.augment(img, rng), "label": record["label"]}


def make_train_iterator(data_cfg, augment: MultiCropAugment, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> TrainIterator:
    """This process's infinite, exactly resumable stream of multi-crop batches from `data_cfg.train_split` of
    any classification source (`crate_jax.data.images.classification`)."""
    cfg = resolve_config(data_cfg)
    source = classification.make_source(cfg, cfg.train_split, "train_split")
    stream = train_stream(source, MultiCropTransform(augment), seed=seed, process_index=process_index,
                          process_count=process_count)
    fingerprint = {"source": cfg.source, "dataset": cfg.name if cfg.source == "tfds" else cfg.source,
                   "split": cfg.train_split, "num_examples": len(source), "seed": int(seed), "views": "multicrop",
                   "process_index": int(process_index), "process_count": int(process_count),
                   "worker_count": int(cfg.worker_count)}
    it = to_iter_dataset(stream, num_threads=int(cfg.num_threads), prefetch_buffer_size=int(cfg.prefetch_buffer_size),
                         worker_count=int(cfg.worker_count), worker_buffer_size=int(cfg.worker_buffer_size))
    return TrainIterator(it, batch_size, fingerprint=fingerprint, epoch_size=len(source) / process_count,
                         max_consecutive_bad=int(cfg.max_consecutive_bad))
