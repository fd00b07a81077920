"""Throughput of the image-text input pipeline: webdataset tar shards vs the ArrayRecord copy.

  .venv/bin/python bench/shard_pipeline.py [--samples 1000] [--source-size 384] [--out-size 84]

Writes shards of photo-like JPEGs (multi-octave smooth noise, so they compress like real photos
rather than like flat synthetic shapes) with random captions, converts them with
``crate_jax.data.image_text.arrayrecord_convert``, and measures, on this machine:

* read only: tar shards read sequentially vs ArrayRecord random access (random index order, what
  grain does) and ArrayRecord sequential access; encoded bytes only, no decoding;
* full pipeline per core (one decode thread, no prefetch): read + decode + CLIPA inception crop to
  ``out_size`` + tokenise, through ``shard_train.make_train_iterator`` and
  ``tfds_captions.make_train_iterator``, with and without JPEG draft decoding;
* the same on the synthetic scenes of ``crate_jax.data.image_text.synth_scenes`` (64 px sources).

Numbers are samples per second (median of ``--repeats`` runs) on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one thread, for per-core numbers

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from crate_jax.data import shard_patterns  # noqa: E402
from crate_jax.data.image_text import arrayrecord_convert, shard_train, synth_scenes, tfds_captions  # noqa: E402
from crate_jax.data.tar_reader import iter_shard  # noqa: E402
from crate_jax.data.tar_writer import write_shard  # noqa: E402
from crate_jax.text.tokenizer import Tokenizer, build_vocab  # noqa: E402

WORDS = ("a photo of the red dog running on a beach with blue sky and two people near old house in "
         "city street at night small cat sitting on wooden table next to green plant").split()


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """``uint8 [size, size*4/3, 3]``: smooth colour noise at three scales plus fine grain."""
    h, w = size, size * 4 // 3
    img = np.full((h, w, 3), 128.0, np.float32)
    for cells, amp in ((4, 90.0), (16, 40.0), (64, 20.0)):
        for c in range(3):
            coarse = rng.normal(0, amp, size=(cells, cells * 4 // 3)).astype(np.float32)
            img[..., c] += np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photo_shards(out: str, n: int, per_shard: int, size: int, seed: int = 0) -> tuple[str, float]:
    rng = np.random.default_rng(seed)
    bases = [photo_like(rng, size) for _ in range(32)]  # each sample: a shifted base + fresh grain
    n_shards = -(-n // per_shard)
    sizes = []
    for s in range(n_shards):
        samples = []
        for i in range(min(per_shard, n - s * per_shard)):
            base = np.roll(bases[int(rng.integers(len(bases)))], tuple(rng.integers(0, size, size=2)), axis=(0, 1))
            grain = rng.integers(-4, 5, size=base.shape, dtype=np.int16)
            buf = io.BytesIO()
            Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            sizes.append(buf.tell())
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 25))))
            samples.append({"__key__": f"{s:05d}{i:05d}", "jpg": buf.getvalue(), "txt": caption,
                            "json": json.dumps({"i": i})})
        write_shard(os.path.join(out, f"{s:05d}.tar"), samples)
    return os.path.join(out, f"{{00000..{n_shards - 1:05d}}}.tar"), float(np.mean(sizes))


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (samples per wall second, per CPU second) of ``fn() -> number of samples``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn()
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def read_tar(pattern: str) -> int:
    return sum(1 for p in shard_patterns.expand_pattern(pattern) for _ in iter_shard(p))


def read_arrayrecord(src, order) -> int:
    for i in order:
        src[int(i)]
    return len(order)


def pipeline(make, n_batches: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median (samples per wall second, samples per CPU second of this process, all threads)."""
    wall, cpu = [], []
    for _ in range(repeats):
        it = make()
        next(it)  # warm-up: opens files, fills the first shuffle block
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        wall.append(n_batches * batch / (time.perf_counter() - t0))
        cpu.append(n_batches * batch / (time.process_time() - c0))
        it.close()
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000, help="image-caption pairs written")
    p.add_argument("--per-shard", type=int, default=125, help="pairs per tar shard")
    p.add_argument("--source-size", type=int, default=384, help="short side of the source JPEGs")
    p.add_argument("--out-size", type=int, default=84, help="side of the crops the pipeline produces")
    p.add_argument("--batch", type=int, default=64, help="batch size of the full pipeline")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (the median is reported)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pattern, mean_bytes = write_photo_shards(os.path.join(tmp, "photos"), a.samples, a.per_shard, a.source_size)
        print(f"wrote {a.samples} photo-like {a.source_size}x{a.source_size * 4 // 3} JPEGs "
              f"(mean {mean_bytes / 1024:.1f} KiB) in {time.perf_counter() - t0:.1f}s")
        conv = arrayrecord_convert.convert(pattern, os.path.join(tmp, "ar"))
        print(f"converted to ArrayRecord in {conv['seconds']:.1f}s")
        vocab = os.path.join(tmp, "vocab.txt")
        build_vocab([" ".join(WORDS)] * 10, vocab, 300)
        tok = Tokenizer(vocab, 32)
        src = tfds_captions.open_source(os.path.join(tmp, "ar"), "train")
        rng = np.random.default_rng(0)
        results["read only: tar, sequential"] = timed(lambda: read_tar(pattern), a.repeats)
        results["read only: arrayrecord, random order"] = timed(
            lambda: read_arrayrecord(src, rng.permutation(len(src))), a.repeats)
        results["read only: arrayrecord, sequential"] = timed(
            lambda: read_arrayrecord(src, np.arange(len(src))), a.repeats)

        n_batches = max(1, a.samples // a.batch - 2)
        common = dict(batch_size=a.batch, image_size=a.out_size, tokenizer=tok, seed=0)
        ar_dir = os.path.join(tmp, "ar")
        for fast in (False, True):
            tag = ", draft decode" if fast else ""
            results[f"tar pipeline, 1 thread{tag}"] = pipeline(
                lambda: shard_train.make_train_iterator(pattern, shuffle_buffer=500, num_threads=1, prefetch=0,
                                                        fast_decode=fast, **common), n_batches, a.batch, a.repeats)
            results[f"arrayrecord pipeline, 1 grain thread{tag}"] = pipeline(
                lambda: tfds_captions.make_train_iterator(ar_dir, num_threads=1, prefetch=1, fast_decode=fast,
                                                          **common), n_batches, a.batch, a.repeats)
        results["tar pipeline, 2 threads + prefetch"] = pipeline(
            lambda: shard_train.make_train_iterator(pattern, shuffle_buffer=500, num_threads=2, prefetch=2, **common),
            n_batches, a.batch, a.repeats)
        results["arrayrecord pipeline, 2 grain threads"] = pipeline(
            lambda: tfds_captions.make_train_iterator(ar_dir, num_threads=2, prefetch=2, **common),
            n_batches, a.batch, a.repeats)

        syn = os.path.join(tmp, "synth")
        synth_scenes.generate(syn, train_samples=a.samples, eval_samples=10, samples_per_shard=a.per_shard,
                              image_size=64)
        task = synth_scenes.load_task(syn)
        results["synth scenes (64 px sources), tar, 1 thread"] = pipeline(
            lambda: shard_train.make_train_iterator(task["train_pattern"], shuffle_buffer=500, num_threads=1,
                                                    prefetch=0, **common), n_batches, a.batch, a.repeats)

    width = max(len(k) for k in results)
    print(f"\nout {a.out_size}px, sources {a.source_size}x{a.source_size * 4 // 3}, {os.cpu_count()} cpus; "
          "samples/s per wall second and per CPU second (= per core)")
    print(f"{'measurement':<{width}}  {'wall':>7}  {'per core':>8}")
    for k, v in results.items():
        wall, cpu = v if isinstance(v, tuple) else (v, float("nan"))
        print(f"{k:<{width}}  {wall:7.0f}  {cpu:8.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "mean_jpeg_bytes": mean_bytes, "samples_per_s": results}, f, indent=1)


if __name__ == "__main__":
    main()
