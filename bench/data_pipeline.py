"""Host data-pipeline throughput: decoded + augmented images/s per core at 224 px.

Recipe: JPEG decode (PIL) -> Inception crop (8-100 % area) -> flip -> RandAugment(2, 9),
on generated 500x375 JPEGs (ImageNet's most common size; smooth content with texture,
quality 90, so file sizes are ImageNet-like rather than those of pure noise).

Two numbers:
  * single-thread: the recipe in a plain loop on one core (images/s/core);
  * loader: ``make_train_iterator`` on an image folder with ``--threads`` grain reader
    threads, divided by the cores this process may use.

    python bench/data_pipeline.py [--images 64] [--seconds 10] [--threads 4]

Prints one line of results.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from crate_jax.data.decode import decode_image
from crate_jax.data.images import augment, loader

_WIDTH, _HEIGHT = 500, 375


def _natural_jpeg(rng: np.random.Generator) -> bytes:
    """A 500x375 JPEG of smooth colour blobs plus fine texture (roughly photo-like statistics)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((_WIDTH, _HEIGHT), Image.Resampling.BICUBIC), np.float32)
    texture = rng.normal(0.0, 12.0, (_HEIGHT, _WIDTH, 1)).astype(np.float32)
    arr = np.clip(base + texture, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _single_thread(jpegs: list[bytes], seconds: float, recipe: augment.TrainAugment) -> float:
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        recipe(decode_image(jpegs[n % len(jpegs)]), rng)
        n += 1
    return n / (time.perf_counter() - start)


def _loader(root: str, seconds: float, threads: int) -> float:
    cfg = loader.default_data_config()
    cfg.update(dict(source="folder", data_dir=root, randaug=(2, 9), num_threads=threads))
    it = loader.make_train_iterator(cfg, batch_size=32, image_size=224, seed=0)
    next(it)  # start the reader threads
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(it)["label"])
    rate = n / (time.perf_counter() - start)
    it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="distinct JPEGs to generate")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per measurement")
    parser.add_argument("--threads", type=int, default=4, help="grain reader threads for the loader run")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    jpegs = [_natural_jpeg(rng) for _ in range(args.images)]
    recipe = augment.TrainAugment(image_size=224, crop="inception_crop", area_min=0.08, flip=True, randaug=(2, 9))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    single = _single_thread(jpegs, args.seconds, recipe)
    with tempfile.TemporaryDirectory() as root:
        for i, data in enumerate(jpegs):
            cls_dir = os.path.join(root, "train", f"class{i % 4}")
            os.makedirs(cls_dir, exist_ok=True)
            with open(os.path.join(cls_dir, f"{i}.jpg"), "wb") as f:
                f.write(data)
        total = _loader(root, args.seconds, args.threads)

    print(
        f"data_pipeline 224px decode+inception_crop+flip+randaug(2,9) on {_WIDTH}x{_HEIGHT} JPEG "
        f"(mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB): single-thread {single:.0f} img/s/core; "
        f"loader {total:.0f} img/s with {args.threads} threads on {cores} cores = {total / cores:.0f} img/s/core"
    )


if __name__ == "__main__":
    main()
