"""Synthetic captioned scenes as real webdataset shards, with a held-out zero-shot task.

Each image shows one coloured shape (the *object*) at one of nine grid positions in one of two
sizes, on a two-tone gradient background, with 0..``max_clutter`` small neutral distractors (grey /
brown / off-white dots and line segments that never use an object colour). The caption describes
it with varied phrasing, e.g. "a large red circle at the top left", "top left: a big red circle",
"a photo of a red circle." (by default one caption in five is such a prompt without size and
position, so the zero-shot prompts are in-distribution for the text tower).

Zero-shot task: the classes are ``colour x shape`` (default 4 x 3 = 12: red / green / blue /
yellow x circle / square / triangle), the class names read "red circle", and the prompts are
``TEMPLATES``. For every class, ``holdout`` of its 18 (size, position) compositions are drawn by
seed and **never** appear in the train shards; the eval shards contain only those compositions.
Each held-out composition is still seen in training with other classes, so the eval measures
whether colour and shape were learnt apart from size and position.

Why these choices: the object colours are saturated and far apart, backgrounds are desaturated
with luminance kept away from the object's, objects are at least a quarter of the image wide, and
distractors are small and neutral; so the visual problem is colour plus coarse shape, which a small
CRATE-alpha can learn in minutes on a CPU, while held-out compositions still test generalisation.

Output (``generate`` / ``python -m crate_jax.data.image_text.synth_scenes --out DIR``)::

  DIR/train/00000.tar ...   members {key}.jpg, {key}.txt, {key}.json (json has 'label' etc.)
  DIR/eval/00000.tar ...    held-out compositions only
  DIR/classes.json          classes, templates, attributes, held-out list, shard patterns
  DIR/templates.txt         zero-shot prompt templates, one per line with {}
  DIR/captions.txt          the train captions and the zero-shot prompts, one per line

The text side is not built here (the data layer does not tokenise): train the WordPiece vocab the
configs expect at ``DIR/vocab.txt`` (``classes.json`` names it) from ``captions.txt`` with
``python -m crate_jax.text.tokenizer --corpus DIR/captions.txt --out DIR/vocab.txt --size 500``
(``VOCAB_SIZE``), as ``main`` prints and ``crate_jax.demos.clipa`` does.

Everything is a pure function of the seed: shard ``i`` of a split depends only on
(seed, split, i), so the same command writes byte-identical shards.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from crate_jax.data.seeding import sample_rng
from crate_jax.data.tar_writer import write_shard

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 230), "yellow": (245, 215, 25),
    "purple": (150, 50, 200), "orange": (250, 130, 20), "cyan": (20, 200, 210), "pink": (245, 110, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.26, "large": 0.42}  # object diameter as a fraction of the image side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
VOCAB_SIZE = 500  # the suggested WordPiece vocab size: the captions use a few dozen words
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
             "bottom right")
WHERE = {  # ways of saying each position in a caption
    "top left": ("at the top left", "in the top left corner", "in the top left"),
    "top": ("at the top", "at the top of the image", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the top right"),
    "left": ("on the left", "at the left", "on the left side"),
    "centre": ("in the centre", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the bottom left"),
    "bottom": ("at the bottom", "at the bottom of the image", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the bottom right"),
}
TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture of a {}.",
             "a drawing of a {}.", "there is a {}.")
_CAPTIONS_FULL = (
    "a {size} {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape} {where}.",
    "{where_title}: a {size} {colour} {shape}",
    "an image of a {colour} {shape}, {size}, {where}",
    "there is a {size} {colour} {shape} {where}.",
    "a picture of a {colour} {shape} {where}",
    "a drawing of a {size} {colour} {shape} on a {bg} background",
)
_CAPTIONS_SHORT = TEMPLATES  # formatted with "colour shape": the prompts themselves
_BACKGROUNDS = {  # name -> (low, high) luminance of the gradient ends, kept desaturated
    "dark": (30, 80), "grey": (90, 140), "light": (150, 190),
}
_NEUTRALS = ((110, 110, 110), (60, 60, 60), (200, 200, 195), (120, 85, 50), (170, 150, 120))
_SUPERSAMPLE = 2
_GRID = (0.25, 0.5, 0.75)


def class_names(colours: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """Class ``i`` is ``colours[i // len(shapes)] + ' ' + shapes[i % len(shapes)]``."""
    return [f"{c} {s}" for c in colours for s in shapes]


def compositions() -> list[tuple[str, str]]:
    """All (size, position) pairs, in a fixed order."""
    return [(size, pos) for size in SIZES for pos in POSITIONS]


def choose_held_out(num_classes: int, holdout: int, seed: int) -> list[list[tuple[str, str]]]:
    """Per class, ``holdout`` (size, position) compositions kept out of training.

    Drawn by seed such that every composition stays in training for at least one class.
    """
    combos = compositions()
    if not 0 < holdout < len(combos):
        raise ValueError(f"holdout must be in [1, {len(combos) - 1}], got {holdout}")
    for attempt in range(1000):
        rng = sample_rng(seed, 0x401D, attempt)
        picks = [sorted(rng.choice(len(combos), holdout, replace=False).tolist()) for _ in range(num_classes)]
        counts = np.bincount([i for p in picks for i in p], minlength=len(combos))
        if counts.max() < num_classes:
            return [[combos[i] for i in p] for p in picks]
    raise ValueError(f"could not hold out {holdout} compositions per class for {num_classes} classes "
                     "while keeping each composition in training")


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: Sequence[float], phase: float) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            a = phase + angle + 2 * math.pi * k / (n * len(radii))
            rad = radii[k % len(radii)]
            pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
        return pts

    if shape == "square":
        return ring(4, [r * 1.1], math.pi / 4)  # side 0.78 d: about a circle's area
    if shape == "triangle":
        return [(x, y + 0.2 * r) for x, y in ring(3, [r * 1.1], 0.0)]  # centroid lowered to centre
    if shape == "star":
        return ring(5, [r * 1.05, r * 0.45], 0.0)
    if shape == "diamond":
        return ring(4, [r], 0.0)
    if shape == "cross":
        w = 0.36 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render_scene(rng: np.random.Generator, colour: str, shape: str, size: str, position: str,
                 image_size: int, max_clutter: int) -> tuple[np.ndarray, str]:
    """Draws one scene: ``uint8 [S, S, 3]`` and the background's name."""
    big = image_size * _SUPERSAMPLE
    bg_name = str(rng.choice(list(_BACKGROUNDS)))
    lo, hi = _BACKGROUNDS[bg_name]
    tint = rng.uniform(-8, 8, size=3)
    ends = [np.clip(rng.uniform(lo, hi) + tint + rng.uniform(-6, 6, size=3), 0, 255) for _ in range(2)]
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
    grad = ends[0][None, None, :] * (1 - ramp[..., None]) + ends[1][None, None, :] * ramp[..., None]
    canvas = np.broadcast_to(grad, (big, big, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(canvas), "RGB")
    draw = ImageDraw.Draw(img)

    for _ in range(int(rng.integers(0, max_clutter + 1))):  # neutral distractors, drawn first
        col = _NEUTRALS[int(rng.integers(len(_NEUTRALS)))]
        if rng.random() < 0.5:
            x, y = rng.uniform(0, big, size=2)
            rad = rng.uniform(0.015, 0.035) * big
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col)
        else:
            x0, y0 = rng.uniform(0, big, size=2)
            length, a = rng.uniform(0.15, 0.35) * big, rng.uniform(0, math.pi)
            draw.line((x0, y0, x0 + length * math.cos(a), y0 + length * math.sin(a)), fill=col,
                      width=max(1, int(0.012 * big)))

    diameter = SIZES[size] * big * rng.uniform(0.9, 1.1)
    r = diameter / 2
    row, col_ = divmod(POSITIONS.index(position), 3)
    jitter = 0.04 * big
    cx = float(np.clip(_GRID[col_] * big + rng.uniform(-jitter, jitter), r + 1, big - r - 1))
    cy = float(np.clip(_GRID[row] * big + rng.uniform(-jitter, jitter), r + 1, big - r - 1))
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, size=3), 0, 255))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        angle = math.radians(rng.uniform(-15, 15))
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(img), bg_name


def make_caption(rng: np.random.Generator, colour: str, shape: str, size: str, position: str,
                 background: str, short_fraction: float = 0.2) -> str:
    """A caption for one scene; with probability ``short_fraction`` a prompt-style one without size
    and position ("a photo of a red circle.")."""
    if rng.random() < short_fraction:
        return _CAPTIONS_SHORT[int(rng.integers(len(_CAPTIONS_SHORT)))].format(f"{colour} {shape}")
    where = WHERE[position][int(rng.integers(3))]
    words = SIZE_WORDS[size]
    template = _CAPTIONS_FULL[int(rng.integers(len(_CAPTIONS_FULL)))]
    return template.format(size=words[int(rng.integers(len(words)))], colour=colour, shape=shape,
                           where=where, where_title=position.capitalize(), bg=background)


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps colours
    return buf.getvalue()


def _shard_samples(task: Mapping[str, Any], split: str, shard: int, count: int, start: int) -> list[dict]:
    rng = sample_rng(task["seed"], 0x5C3E, 0 if split == "train" else 1, shard)
    classes = task["classes"]
    colours, shapes = task["colours"], task["shapes"]
    held = {i: {tuple(c) for c in combos} for i, combos in enumerate(task["held_out_by_index"])}
    all_combos = compositions()
    samples = []
    for j in range(count):
        label = int(rng.integers(len(classes)))
        allowed = ([c for c in all_combos if c not in held[label]] if split == "train"
                   else sorted(held[label]))
        size, position = allowed[int(rng.integers(len(allowed)))]
        colour, shape = colours[label // len(shapes)], shapes[label % len(shapes)]
        image, background = render_scene(rng, colour, shape, size, position, task["image_size"],
                                         task["max_clutter"])
        caption = make_caption(rng, colour, shape, size, position, background, task["short_captions"])
        meta = {"label": label, "class": classes[label], "colour": colour, "shape": shape, "size": size,
                "position": position, "background": background, "caption": caption}
        samples.append({"__key__": f"{split}{start + j:07d}", "jpg": _encode_jpeg(image, task["jpeg_quality"]),
                        "txt": caption, "json": json.dumps(meta, sort_keys=True)})
    return samples


def _write_one(args: tuple[Mapping[str, Any], str, int, int, int, str]) -> list[str]:
    task, split, shard, count, start, path = args
    samples = _shard_samples(task, split, shard, count, start)
    write_shard(path, samples)
    return [s["txt"] for s in samples]


def generate(out_dir: str | os.PathLike, *, train_samples: int = 20_000, eval_samples: int = 2_000,
             samples_per_shard: int = 1_000, image_size: int = 64, seed: int = 0,
             colours: Sequence[str] = ("red", "green", "blue", "yellow"),
             shapes: Sequence[str] = ("circle", "square", "triangle"), holdout: int = 3,
             max_clutter: int = 2, jpeg_quality: int = 92, short_captions: float = 0.2,
             workers: int = 1) -> dict[str, Any]:
    """Writes train / eval shards, ``classes.json``, ``templates.txt`` and ``captions.txt`` (the corpus
    for the vocab, which the caller trains: see the module docstring).

    ``short_captions`` is the fraction of captions that are just a prompt ("a photo of a red
    circle."): raising it makes zero-shot easier, lowering it makes the text tower rely more on the
    long, compositional captions. ``workers`` > 1 writes shards in parallel processes.

    Returns the contents of ``classes.json`` (shard patterns relative to ``out_dir``).
    """
    for c in colours:
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; choose from {sorted(COLOURS)}")
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {SHAPES}")
    if len(set(colours)) != len(colours) or len(set(shapes)) != len(shapes):
        raise ValueError(f"colours {colours} and shapes {shapes} must not repeat")
    if min(train_samples, eval_samples, samples_per_shard) < 1 or image_size < 16:
        raise ValueError("sample counts must be >= 1 and image_size >= 16")
    out_dir = os.fspath(out_dir)
    classes = class_names(colours, shapes)
    held = choose_held_out(len(classes), holdout, seed)
    task: dict[str, Any] = {
        "seed": seed, "image_size": image_size, "max_clutter": max_clutter, "jpeg_quality": jpeg_quality,
        "short_captions": short_captions,
        "colours": list(colours), "shapes": list(shapes), "classes": classes,
        "held_out_by_index": [[list(c) for c in combos] for combos in held],
    }
    jobs, patterns, counts = [], {}, {}
    for split, total in (("train", train_samples), ("eval", eval_samples)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        n_shards = math.ceil(total / samples_per_shard)
        for i in range(n_shards):
            count = min(samples_per_shard, total - i * samples_per_shard)
            path = os.path.join(out_dir, split, f"{i:05d}.tar")
            jobs.append((task, split, i, count, i * samples_per_shard, path))
        patterns[split] = f"{split}/{{00000..{n_shards - 1:05d}}}.tar"
        counts[split] = total
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            caption_lists = list(pool.map(_write_one, jobs))
    else:
        caption_lists = [_write_one(job) for job in jobs]
    train_captions = [c for job, caps in zip(jobs, caption_lists) if job[1] == "train" for c in caps]
    prompts = [t.format(name) for name in classes for t in TEMPLATES]
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(train_captions + prompts) + "\n")
    with open(os.path.join(out_dir, "templates.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    info = {
        "classes": classes, "templates": list(TEMPLATES), "colours": list(colours), "shapes": list(shapes),
        "sizes": list(SIZES), "positions": list(POSITIONS),
        "held_out": {classes[i]: [list(c) for c in combos] for i, combos in enumerate(held)},
        "train_pattern": patterns["train"], "eval_pattern": patterns["eval"],
        "num_train": counts["train"], "num_eval": counts["eval"], "image_size": image_size, "seed": seed,
        "label_key": "label", "captions": "captions.txt", "vocab": "vocab.txt", "max_clutter": max_clutter,
        "short_captions": short_captions,
    }
    with open(os.path.join(out_dir, "classes.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def load_task(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``classes.json`` of a generated directory, with shard patterns, captions and vocab made absolute."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, "classes.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; generate the scenes first: "
                                f"python -m crate_jax.data.image_text.synth_scenes --out {out_dir}")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    for key in ("train_pattern", "eval_pattern", "captions", "vocab"):
        if key in info:  # directories written before captions.txt existed have no 'captions'
            info[key] = os.path.join(out_dir, info[key])
    return info


def vocab_command(out_dir: str | os.PathLike) -> str:
    """The shell command that trains ``out_dir``'s vocab.txt from its captions.txt."""
    out_dir = os.fspath(out_dir)
    return (f"python -m crate_jax.text.tokenizer --corpus {os.path.join(out_dir, 'captions.txt')} "
            f"--out {os.path.join(out_dir, 'vocab.txt')} --size {VOCAB_SIZE}")


def main(argv: Sequence[str] | None = None) -> None:
    from crate_jax.cli import tool_parser
    p = tool_parser("crate_jax.data.image_text.synth_scenes", __doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-samples", type=int, default=20_000, help="training images")
    p.add_argument("--eval-samples", type=int, default=2_000, help="held-out images")
    p.add_argument("--samples-per-shard", type=int, default=1_000, help="images per tar shard")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawing")
    p.add_argument("--colours", default="red,green,blue,yellow", help=f"from {','.join(COLOURS)}")
    p.add_argument("--shapes", default="circle,square,triangle", help=f"from {','.join(SHAPES)}")
    p.add_argument("--holdout", type=int, default=3, help="held-out (size, position) pairs per class")
    p.add_argument("--max-clutter", type=int, default=2, help="most distractor shapes per image")
    p.add_argument("--jpeg-quality", type=int, default=92, help="JPEG quality (1-95)")
    p.add_argument("--short-captions", type=float, default=0.2, help="fraction of prompt-style captions")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    info = generate(a.out, train_samples=a.train_samples, eval_samples=a.eval_samples,
                    samples_per_shard=a.samples_per_shard, image_size=a.image_size, seed=a.seed,
                    colours=a.colours.split(","), shapes=a.shapes.split(","), holdout=a.holdout,
                    max_clutter=a.max_clutter, jpeg_quality=a.jpeg_quality, short_captions=a.short_captions,
                    workers=a.workers)
    dt = time.perf_counter() - t0
    n = info["num_train"] + info["num_eval"]
    print(f"wrote {n} scenes ({len(info['classes'])} classes) to {a.out} in {dt:.1f}s "
          f"({n / dt:.0f} images/s); train {info['train_pattern']}, eval {info['eval_pattern']}")
    print("next, train the vocab on its captions:\n"
          f"  {vocab_command(a.out)}")


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
