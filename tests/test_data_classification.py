"""Tests for the classification data pipeline (crate_jax.data.{augment,classification,crops,decode,loader})."""

import collections
import io
import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

from crate_jax.data import crops
from crate_jax.data.decode import DecodeError, decode_image, to_array
from crate_jax.data.images import augment, classification, loader


def _digits_cfg(**overrides):
    cfg = loader.default_data_config()
    cfg.update(dict(source="digits", train_split="train", eval_split="test", augment="none", flip=False,
                    num_threads=2, prefetch_buffer_size=16))
    cfg.update(overrides)
    return cfg


def _key(image, label):
    return image.tobytes() + int(label).to_bytes(2, "little")


def _jpeg(h, w, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------- digits source


def test_digits_split_is_stratified_disjoint_and_fixed_by_seed():
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = classification.DigitsSource("train", 0.2, split_seed=0)
    test = classification.DigitsSource("test", 0.2, split_seed=0)
    assert len(train) + len(test) == len(digits.target) == 1797
    assert len(test) == math.ceil(0.2 * 1797)
    assert set(train.indices).isdisjoint(test.indices)
    assert set(train.indices) | set(test.indices) == set(range(1797))
    # Stratified: every class's test share is within one example of 20 %.
    for c in range(10):
        n_c = int((digits.target == c).sum())
        assert abs(int((digits.target[test.indices] == c).sum()) - 0.2 * n_c) <= 1
    # Fixed by split_seed; another seed gives another split.
    again = classification.DigitsSource("test", 0.2, split_seed=0)
    other = classification.DigitsSource("test", 0.2, split_seed=1)
    np.testing.assert_array_equal(test.indices, again.indices)
    assert not np.array_equal(test.indices, other.indices)
    # Real pixels scaled 0..16 -> 0..255, three equal channels.
    rec = test[5]
    src = digits.images[test.indices[5]]
    assert rec["image"].shape == (8, 8, 3) and rec["image"].dtype == np.uint8
    np.testing.assert_array_equal(rec["image"][..., 0], np.round(src * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(rec["image"][..., 0], rec["image"][..., 2])
    assert rec["label"] == digits.target[test.indices[5]]
    assert max(int(test[i]["image"].max()) for i in range(len(test))) == 255


# ----------------------------------------------------------------------------- train iterator


def test_train_batches_shapes_and_augmentation_deterministic_by_seed():
    cfg = _digits_cfg(augment="inception_crop", flip=True, randaug=(2, 9))
    it = loader.make_train_iterator(cfg, batch_size=8, image_size=24, seed=3)
    batches = _take(it, 3)
    b = batches[0]
    assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert set(b) == {"image", "label"}
    same = _take(loader.make_train_iterator(cfg, batch_size=8, image_size=24, seed=3), 3)
    assert _same_batches(batches, same)
    other = _take(loader.make_train_iterator(cfg, batch_size=8, image_size=24, seed=4), 3)
    assert not np.array_equal(batches[0]["image"], other[0]["image"])
    assert it.stats()["batches"] == 3 and it.stats()["bad_images"] == 0


def test_train_epochs_across_two_processes_are_disjoint_and_complete():
    # image_size 8 with augment='none' leaves the 8x8 digits untouched, so each example is
    # recognisable. Both processes read 3 batches of 479: 2 * 1437 elements = 2 epochs.
    cfg = _digits_cfg()
    source = classification.DigitsSource("train")
    n = len(source)
    assert n == 1437 == 3 * 479
    per_process = []
    for p in range(2):
        it = loader.make_train_iterator(cfg, batch_size=479, image_size=8, seed=0, process_index=p, process_count=2)
        batches = _take(it, 3)
        per_process.append([_key(img, lab) for b in batches for img, lab in zip(b["image"], b["label"])])
    # Global order: position g is element g // 2 of process g % 2.
    global_order = [per_process[g % 2][g // 2] for g in range(2 * n)]
    everything = collections.Counter(_key(source[i]["image"], source[i]["label"]) for i in range(n))
    epoch0, epoch1 = global_order[:n], global_order[n:]
    assert collections.Counter(epoch0) == everything
    assert collections.Counter(epoch1) == everything
    assert epoch0 != epoch1  # reshuffled every epoch
    # Within the first epoch the two processes' elements are disjoint as a multiset split.
    p0, p1 = collections.Counter(epoch0[0::2]), collections.Counter(epoch0[1::2])
    assert p0 + p1 == everything


def test_exact_resume_from_state():
    cfg = _digits_cfg(augment="inception_crop", flip=True, randaug=(2, 9))
    kwargs = dict(batch_size=8, image_size=16, seed=7, process_index=1, process_count=2)
    reference = _take(loader.make_train_iterator(cfg, **kwargs), 5)
    first = loader.make_train_iterator(cfg, **kwargs)
    head = _take(first, 2)
    state = json.loads(json.dumps(first.get_state()))  # must survive a JSON round trip
    resumed = loader.make_train_iterator(cfg, **kwargs)
    resumed.set_state(state)
    tail = _take(resumed, 3)
    assert _same_batches(head + tail, reference)
    assert resumed.stats()["batches"] == 5
    wrong_seed = loader.make_train_iterator(cfg, **{**kwargs, "seed": 8})
    with pytest.raises(ValueError, match="seed"):
        wrong_seed.set_state(state)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume():
    # worker_count > 0 pickles sources and transforms into grain worker processes.
    cfg = _digits_cfg(augment="inception_crop", flip=True, randaug=(2, 9))
    kwargs = dict(batch_size=4, image_size=16, seed=1)
    reference = _take(loader.make_train_iterator(cfg, **kwargs), 4)
    cfg.worker_count = 2
    first = loader.make_train_iterator(cfg, **kwargs)
    head = _take(first, 2)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = loader.make_train_iterator(cfg, **kwargs)
    resumed.set_state(state)
    tail = _take(resumed, 2)
    resumed.close()
    assert _same_batches(head + tail, reference)


def test_train_stream_generic_sharding():
    # The generic stream on a plain list of records: epoch e is a permutation, processes interleave.
    records = [{"image": np.full((2, 2, 3), i, np.uint8), "label": np.int32(i), "id": str(i)} for i in range(10)]
    transform = loader.ImageRecordTransform(lambda img, rng: to_array(img))
    streams = [loader.train_stream(records, transform, seed=0, process_index=p, process_count=2) for p in range(2)]
    labels = [[int(streams[p][i]["label"]) for i in range(10)] for p in range(2)]
    merged = [labels[g % 2][g // 2] for g in range(20)]
    assert sorted(merged[:10]) == list(range(10)) and sorted(merged[10:]) == list(range(10))
    assert loader.eval_shard(7, 0, 2) == (0, 3) and loader.eval_shard(7, 1, 2) == (3, 7)


# ----------------------------------------------------------------------------- eval iterator


def test_eval_two_processes_cover_every_example_once():
    cfg = _digits_cfg()
    source = classification.DigitsSource("test")
    n = len(source)  # 360: 180 per process -> 3 batches of 64, the last padded by 12
    seen, lengths = collections.Counter(), []
    for p in range(2):
        ev = loader.make_eval_iterator(cfg, split="test", batch_size=64, image_size=8, process_index=p, process_count=2)
        batches = list(ev)
        assert len(batches) == len(ev) == 3
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape == (64, 8, 8, 3) and b["mask"].dtype == bool and b["label"].dtype == np.int32
            for img, lab, m in zip(b["image"], b["label"], b["mask"]):
                if m:
                    seen[_key(img, lab)] += 1
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.sum() == 180 and mask[:180].all() and not mask[180:].any()
        assert list(ev) and ev.stats()["examples"] == 2 * 180  # re-iterable, counters cumulative
    assert seen == collections.Counter(_key(source[i]["image"], source[i]["label"]) for i in range(n))
    assert lengths[0] == lengths[1]


# ----------------------------------------------------------------------------- bad images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,val}/{cat,dog}/: 3 good JPEG/PNG per class, plus 1 corrupt and 1 truncated file."""
    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{cls}{i}.jpg").write_bytes(_jpeg(20 + 3 * i, 30 - i, seed=10 * c + i))
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / split / "dog" / "gray.png")  # grayscale PNG
        (root / split / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 5)
        good = _jpeg(40, 40, seed=99)
        (root / split / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (root / split / "dog" / "notes.txt").write_text("not an image")  # ignored
    return str(root)


def test_folder_bad_images_are_skipped_counted_and_named(image_folder, caplog):
    cfg = loader.default_data_config()
    cfg.update(dict(source="folder", data_dir=image_folder, train_split="train", eval_split="val",
                    randaug=(2, 9), num_threads=2))
    assert loader.num_classes(cfg) == 2 and loader.num_examples(cfg, "train") == 9
    it = loader.make_train_iterator(cfg, batch_size=7, image_size=32, seed=0)
    with caplog.at_level(logging.WARNING, logger="crate_jax.data.batching"):
        batches = _take(it, 2)  # 14 good = 2 epochs of 7 good: reads past all of epoch 0
    assert all(b["image"].shape == (7, 32, 32, 3) for b in batches)
    stats = it.stats()
    assert stats["bad_images"] >= 2 and stats["examples"] == 14
    assert stats["bad_images"] == it.get_state()["elements"] - 14
    logged = caplog.text
    assert os.path.join("train", "cat", "corrupt.jpg") in logged
    assert os.path.join("train", "dog", "truncated.jpg") in logged and "truncated" in logged

    ev = loader.make_eval_iterator(cfg, batch_size=4, image_size=32)
    eval_batches = list(ev)
    assert len(eval_batches) == 3  # 9 files -> 3 batches of 4; 2 bad -> 7 real examples
    mask = np.concatenate([b["mask"] for b in eval_batches])
    assert mask.sum() == 7 and ev.stats()["bad_images"] == 2
    labels = np.concatenate([b["label"] for b in eval_batches])[mask]
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]


def test_all_bad_images_stop_with_an_error(tmp_path):
    for i in range(5):
        (tmp_path / "train" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "x" / f"{i}.jpg").write_bytes(b"junk")
    cfg = loader.default_data_config()
    cfg.update(dict(source="folder", data_dir=str(tmp_path), max_consecutive_bad=10, num_threads=0))
    it = loader.make_train_iterator(cfg, batch_size=2, image_size=16, seed=0)
    with pytest.raises(RuntimeError, match=r"10 images in a row failed to decode \(last: \S*x.\d\.jpg: .*\)\. "
                                           r"This is a broken data set .* raise config\.data\.max_consecutive_bad"):
        next(it)


# ----------------------------------------------------------------------------- tfds


def _pil_encode(self, np_image):
    """Stand-in for TFDS's TensorFlow image encoder, so mocked records carry real JPEG/PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np_image[..., 0] if np_image.shape[-1] == 1 else np_image).save(
        buf, format="JPEG" if self.encoding_format == "jpeg" else "PNG"
    )
    return buf.getvalue()


@pytest.mark.parametrize("decoder", ["pil", "tfds"])
def test_tfds_mock_imagenet2012_end_to_end(decoder, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    if decoder == "pil":  # the mock encodes images for SkipDecoding with TF; use PIL instead
        from tensorflow_datasets.core.features import image_feature

        monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", _pil_encode)
    cfg = loader.default_data_config()
    cfg.update(dict(source="tfds", name="imagenet2012", randaug=(2, 9), tfds_decoder=decoder, num_threads=2))
    with tfds.testing.mock_data(num_examples=10):
        assert loader.num_classes(cfg) == 1000
        assert loader.num_examples(cfg, "validation") == 10
        it = loader.make_train_iterator(cfg, batch_size=4, image_size=32, seed=0)
        b = next(it)
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 1000)).all()
        assert b["image"].std() > 0 and it.stats()["bad_images"] == 0
        masks = []
        for p in range(2):
            ev = loader.make_eval_iterator(cfg, batch_size=4, image_size=32, process_index=p, process_count=2)
            masks += [bb["mask"] for bb in ev]
        assert sum(m.sum() for m in masks) == 10 and len(masks) == 4


@pytest.fixture(scope="module")
def prepared_tfds_dir(tmp_path_factory):
    """A tiny ArrayRecord TFDS dataset (not in the catalog, like a local imagenet21k build) with one corrupt image."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class CrateTinyImagenet21k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=5),
                    "file_name": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8), "validation": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                image = b"broken" * 20 if i == 3 else _jpeg(16 + i, 24, seed=i)
                yield i, {"image": image, "label": i % 5, "file_name": f"img{i}.JPEG"}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    CrateTinyImagenet21k(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


@pytest.mark.parametrize("decoder", ["pil", "tfds"])
def test_tfds_dataset_prepared_in_data_dir(decoder, prepared_tfds_dir, caplog):
    cfg = loader.default_data_config()
    cfg.update(dict(source="tfds", name="crate_tiny_imagenet21k", data_dir=prepared_tfds_dir, num_threads=0,
                    tfds_decoder=decoder))
    assert loader.num_classes(cfg) == 5 and loader.num_examples(cfg, "train") == 8
    it = loader.make_train_iterator(cfg, batch_size=7, image_size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="crate_jax.data.batching"):
        batches = _take(it, 2)  # 14 good > 7 good per epoch: the corrupt one was read
    assert all(b["image"].shape == (7, 16, 16, 3) for b in batches)
    assert it.stats()["bad_images"] >= 1
    assert "crate_tiny_imagenet21k/train[" in caplog.text and "img3.JPEG" in caplog.text
    ev = loader.make_eval_iterator(cfg, batch_size=8, image_size=16)
    (only,) = list(ev)
    assert only["mask"].sum() == 4 and ev.stats()["bad_images"] == 1


# ----------------------------------------------------------------------------- errors


def test_config_errors_are_actionable(tmp_path, prepared_tfds_dir):
    with pytest.raises(ValueError, match=r"config.data.source='lmdb'.*digits"):
        loader.num_classes(_digits_cfg(source="lmdb"))
    with pytest.raises(ValueError, match=r"unknown config.data keys \['shufle_buffer'\]"):
        loader.num_classes(_digits_cfg(shufle_buffer=10))
    with pytest.raises(ValueError, match=r"config.data.randaug"):
        loader.num_classes(_digits_cfg(randaug=(2, 15)))
    with pytest.raises(ValueError, match="digits split 'validation'"):
        loader.num_examples(_digits_cfg(), "validation")
    with pytest.raises(ValueError, match="resize_small=200 is smaller than image_size=224"):
        loader.make_eval_iterator(_digits_cfg(augment="inception_crop", resize_small=200), batch_size=2, image_size=224)
    folder = loader.default_data_config()
    folder.source = "folder"
    with pytest.raises(ValueError, match="data_dir must be set"):
        loader.num_classes(folder)
    folder.data_dir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        loader.num_classes(folder)
    (tmp_path / "train" / "cls").mkdir(parents=True)
    folder.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"holds no images.*\.jpg"):
        loader.num_examples(folder, "train")
    with pytest.raises(ValueError, match=r"no split directory 'validation'.*\['train'\]"):
        loader.num_examples(folder, "validation")
    empty_dir = tmp_path / "tfds_empty"
    empty_dir.mkdir()
    tfds_cfg = loader.default_data_config()
    tfds_cfg.data_dir = str(empty_dir)
    with pytest.raises(ValueError, match=r"'imagenet2012' is not prepared in data_dir '.*tfds_empty'.*array_record"):
        loader.num_classes(tfds_cfg)
    tfds_cfg.update(dict(name="crate_tiny_imagenet21k", data_dir=prepared_tfds_dir))
    with pytest.raises(ValueError, match=r"config.data.eval_split='test'.*Unknown split"):
        loader.make_eval_iterator(tfds_cfg, split="test", batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="label_key='class'"):
        loader.num_classes(dict(tfds_cfg.items(), label_key="class"))


# ----------------------------------------------------------------------------- image ops


def test_decode_handles_modes_and_rejects_bad_data():
    gray = io.BytesIO()
    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(gray, format="PNG")
    img = decode_image(gray.getvalue())
    assert img.mode == "RGB" and img.size == (7, 5) and to_array(img)[0, 0].tolist() == [200] * 3
    rgba = decode_image(np.zeros((4, 4, 4), np.uint8))
    assert rgba.mode == "RGB"
    good = _jpeg(32, 32, 0)
    for bad in (good[: len(good) // 2], b"nope", np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(DecodeError):
            decode_image(bad)


def test_inception_crop_follows_tf_sample_distorted_bounding_box():
    """TrainAugment's crop is the one Inception crop (crops.inception_crop, TF's
    sample_distorted_bounding_box as big_vision draws it): area area_min..1, aspect 3/4..4/3, the
    whole image when no box fits; deterministic given the rng."""
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (64, 640), (10, 10)]:
        areas, aspects, whole = [], [], 0
        for _ in range(300):
            x, y, w, h = crops.sample_distorted_box(width, height, rng, (0.08, 1.0))
            assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= width and y + h <= height
            if (w, h) == (width, height):
                whole += 1
                continue
            areas.append(w * h / (width * height))
            aspects.append(w / h)
        assert areas and 0.08 <= min(areas) and max(areas) <= 1.0
        assert 3 / 4 - 0.05 <= min(aspects) and max(aspects) <= 4 / 3 + 0.05  # w = round(h * aspect)
        if (width, height) == (500, 375):  # every draw fits here: the whole range is used, no fallback
            assert whole == 0 and min(areas) < 0.15 and max(areas) > 0.9
            assert min(aspects) < 0.8 and max(aspects) > 1.28
    # No 99 % box of aspect >= 3/4 fits a 1:100 image: the fallback is the whole image.
    assert crops.sample_distorted_box(10, 1000, np.random.default_rng(0), (0.99, 1.0)) == (0, 0, 10, 1000)

    arr = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    recipe = augment.TrainAugment(image_size=24, area_min=0.3, flip=False)
    out = recipe(img, np.random.default_rng(5))
    x, y, w, h = crops.sample_distorted_box(120, 90, np.random.default_rng(5), (0.3, 1.0))
    assert (w, h) != (120, 90)
    expected = img.resize((24, 24), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
    assert out.dtype == np.uint8 and np.array_equal(out, np.asarray(expected))  # that box, resized bilinearly
    assert np.array_equal(out, recipe(img, np.random.default_rng(5)))
    assert not np.array_equal(out, recipe(img, np.random.default_rng(6)))


def test_eval_resize_small_centre_crop_and_plain_resize():
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:, 150:] = 255  # left half black, right half white
    out = augment.EvalPreprocess(image_size=100, resize_small=128)(Image.fromarray(arr))
    assert out.shape == (100, 100, 3)
    assert out[:, :45].max() == 0 and out[:, 55:].min() == 255  # centred: the edge stays in the middle
    small = augment.EvalPreprocess(image_size=16)(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    assert small.shape == (16, 16, 3)


def test_randaugment_ops_change_the_image_and_keep_its_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(40, 200, (32, 40, 3), dtype=np.uint8)  # not full range: autocontrast has work
    arr[:8] = 60
    img = Image.fromarray(arr)
    for name, op in augment.RANDAUG_OPS.items():
        out = op(img, 0.9, np.random.default_rng(1))
        assert out.size == img.size and out.mode == "RGB", name
        assert not np.array_equal(np.asarray(out), arr), name
    a = augment.randaugment(img, np.random.default_rng(5), 2, 9)
    b = augment.randaugment(img, np.random.default_rng(5), 2, 9)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="magnitude"):
        augment.randaugment(img, rng, 2, 11)
