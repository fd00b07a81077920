"""Image-text data path: webdataset shards, TFDS/ArrayRecord layout, converter, synthetic scenes."""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from crate_jax.data import batching, crops
from crate_jax.data.decode import DecodeError, draft_decode, open_image
from crate_jax.data.image_text import arrayrecord_convert, shard_eval, shard_train, synth_scenes, tfds_captions
from crate_jax.data.shard_patterns import expand_braces, expand_pattern
from crate_jax.data.tar_reader import ShardError, iter_shard
from crate_jax.data.tar_writer import write_shard
from crate_jax.text.tokenizer import Tokenizer, build_vocab_file

S = 24  # output image size in tests


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """6 train shards x 20 samples, 2 eval shards, 32 px images."""
    out = tmp_path_factory.mktemp("scenes")
    synth_scenes.generate(out, train_samples=120, eval_samples=36, samples_per_shard=20, image_size=32, seed=3)
    task = synth_scenes.load_task(out)
    build_vocab_file(task["captions"], task["vocab"], 300)
    return task


@pytest.fixture(scope="module")
def tok(scenes):
    return Tokenizer(scenes["vocab"], 16)


def _jpeg(colour, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _sample(key, i, **extra):
    return {"__key__": key, "jpg": _jpeg((10 * i % 256, 80, 160)), "txt": f"a red circle {i}", **extra}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Shards with every kind of damage, and the keys that must survive."""
    d = tmp_path_factory.mktemp("damaged")
    good = [_sample(f"g{i:02d}", i) for i in range(10)]
    good[3]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"  # corrupt image
    del good[6]["txt"]  # missing caption
    write_shard(d / "0.tar", good)
    write_shard(d / "1.tar", [_sample(f"t{i:02d}", i) for i in range(8)])
    t05 = [s for s in iter_shard(str(d / "1.tar")) if s.key == "t05"][0]
    raw = (d / "1.tar").read_bytes()
    (d / "1.tar").write_bytes(raw[: t05.start + 700])  # cut inside sample t05's jpg
    (d / "2.tar").write_bytes(os.urandom(3000))  # garbage, not a tar
    (d / "3.tar").write_bytes(b"")  # empty
    write_shard(d / "5.tar", [_sample(f"h{i:02d}", i) for i in range(6)])
    # 4.tar does not exist.
    expected = ({f"g{i:02d}" for i in range(10)} - {"g03", "g06"}) | {f"t{i:02d}" for i in range(5)} \
        | {f"h{i:02d}" for i in range(6)}
    return str(d / "{0..5}.tar"), expected


def _keys(batches):
    return [k.rsplit(":", 1)[1] for b in batches for k in b["key"]]


def _train(pattern, tok, **kw):
    args = dict(batch_size=5, image_size=S, tokenizer=tok, seed=0, shuffle_buffer=7, cycle_length=2,
                num_threads=2, prefetch=2, with_keys=True)
    args.update(kw)
    return shard_train.make_train_iterator(pattern, **args)


def _take(it, n):
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


# ----------------------------------------------------------------------------- patterns


def test_expand_pattern(tmp_path):
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{0..10..5}-{a,b{1..2}}") == ["0-a", "0-b1", "0-b2", "5-a", "5-b1", "5-b2",
                                                       "10-a", "10-b1", "10-b2"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("lit{x}.tar") == ["lit{x}.tar"]
    assert expand_pattern("a{0..1}.tar, b.tar::c{1,2}.tar") == ["a0.tar", "a1.tar", "b.tar", "c1.tar", "c2.tar"]
    assert expand_pattern(["a.tar", "gs://bkt/d/{08..10}.tar"]) == [
        "a.tar", "gs://bkt/d/08.tar", "gs://bkt/d/09.tar", "gs://bkt/d/10.tar"]
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_pattern(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="listed twice"):
        expand_pattern("a{0,0}.tar")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_pattern(str(tmp_path / "*.zip"))


def test_process_and_filesystem_errors(scenes, tok):
    with pytest.raises(ValueError, match="2 shard.*3 processes"):
        _train(scenes["eval_pattern"], tok, process_index=0, process_count=3)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gcsfs"):
            _train("gs://bucket/shards/{0..3}.tar", tok)


# ----------------------------------------------------------------------------- train stream


def test_each_epoch_covers_every_sample_once_across_two_processes(scenes, tok):
    all_keys = {s.key for p in expand_pattern(scenes["train_pattern"]) for s in iter_shard(p)}
    assert len(all_keys) == 120
    per_process = []
    for p in range(2):
        batches = _take(_train(scenes["train_pattern"], tok, process_index=p, process_count=2), 24)
        assert batches[0]["image"].shape == (5, S, S, 3) and batches[0]["image"].dtype == np.uint8
        assert batches[0]["text"].shape == (5, 16) and batches[0]["text"].dtype == np.int32
        keys = _keys(batches)
        epoch0, epoch1 = keys[:60], keys[60:]  # 3 shards x 20 samples per process
        assert len(set(epoch0)) == 60 and set(epoch1) == set(epoch0)
        assert epoch0 != epoch1  # reshuffled every epoch
        per_process.append(set(epoch0))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == all_keys


def test_shuffle_is_deterministic_by_seed(scenes, tok):
    a = _take(_train(scenes["train_pattern"], tok, seed=5), 6)
    b = _take(_train(scenes["train_pattern"], tok, seed=5, num_threads=1, prefetch=0), 6)
    c = _take(_train(scenes["train_pattern"], tok, seed=6), 6)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
    assert _keys(a) == _keys(b) and _keys(a) != _keys(c)
    # Not the file order: shards and samples are both shuffled.
    ordered = _keys(_take(_train(scenes["train_pattern"], tok, shuffle=False, cycle_length=1), 6))
    assert ordered == [f"train{i:07d}" for i in range(30)]
    assert _keys(a) != ordered


@pytest.mark.parametrize("which", ["scenes", "damaged"])
def test_exact_resume_mid_shard(which, scenes, damaged, tok):
    pattern = scenes["train_pattern"] if which == "scenes" else damaged[0]
    n_head = 5 if which == "scenes" else 2
    full_it = _train(pattern, tok, seed=1)
    full = _take(full_it, 13)
    head_it = _train(pattern, tok, seed=1)
    head = [next(head_it) for _ in range(n_head)]
    state = json.loads(json.dumps(head_it.get_state()))
    head_stats = head_it.stats()
    head_it.close()
    # The saved position is inside a shard and inside a shuffle block.
    assert state["pos"] > 0 and any(offset > 0 and index > 0 for _, offset, index in state["block"]["stream"]["open"])
    tail_it = _train(pattern, tok, seed=1, num_threads=1, prefetch=0)
    tail_it.set_state(state)
    assert tail_it.stats() == head_stats
    tail = _take(tail_it, 13 - n_head)
    for x, y in zip(full, head + tail):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
        assert list(x["key"]) == list(y["key"])
    assert tail_it.stats() == full_it.stats()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        _train(pattern, tok, seed=2).set_state(state)


def test_damaged_inputs_are_skipped_counted_and_logged(damaged, tok, caplog):
    pattern, expected = damaged
    caplog.set_level(logging.WARNING, logger="crate_jax.data.batching")
    it = _train(pattern, tok, batch_size=1, shuffle=False, cycle_length=1)
    keys = _keys(_take(it, len(expected)))
    assert set(keys) == expected and len(keys) == len(expected)  # one clean epoch of what is readable
    stats = it.stats()
    assert stats["bad_images"] == 1 and stats["missing_captions"] == 1
    assert stats["truncated_shards"] == 1 and stats["bad_shards"] == 3  # garbage, empty, missing file
    assert stats["samples"] == len(expected)
    text = caplog.text
    assert "0.tar: sample 'g03': undecodable image" in text and "0.tar: sample 'g06' has no caption" in text
    assert "1.tar: member t05.jpg is cut short" in text
    assert "2.tar: invalid tar header at byte 0" in text and "3.tar: empty file" in text
    assert "4.tar: cannot open" in text


def test_skip_counter_logs_first_then_every_kth_and_stops_a_bad_run(caplog):
    counter = batching.SkipCounter(("samples", "bad_images"), max_in_a_row=5, advice="Check the decoder.")
    with caplog.at_level(logging.WARNING, logger="crate_jax.data.batching"):
        for i in range(2100):
            counter.skip("bad_images", f"0.tar: sample 'k{i}'")
            counter.used("samples")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == batching.LOG_FIRST + 2  # #1..#20, then #1000 and #2000
    assert logged[0] == "skipped (bad_images #1): 0.tar: sample 'k0'"
    assert logged[-1] == "skipped (bad_images #2000): 0.tar: sample 'k1999'"
    assert counter.snapshot() == {"samples": 2100, "bad_images": 2100}
    for i in range(4):
        counter.skip("bad_images", f"k{i}")
    with pytest.raises(RuntimeError, match=r"^5 images in a row failed to decode \(last: k4\)\. Check the decoder\.$"):
        counter.skip("bad_images", "k4")
    counter.restore({"bad_images": 3})  # a resumed run starts a fresh run of skips
    counter.skip("bad_images", "k5")
    assert counter.snapshot() == {"samples": 0, "bad_images": 4}
    rows, mask = batching.pad_rows(["a", "b"], 4, "")
    assert rows == ["a", "b", "", ""] and mask.tolist() == [True, True, False, False]


def test_all_shards_unusable_is_an_error(tmp_path, tok):
    (tmp_path / "0.tar").write_bytes(b"junk" * 300)
    with pytest.raises(RuntimeError, match="none of the 1 shards"):
        _take(_train(str(tmp_path / "0.tar"), tok, prefetch=0), 1)


def test_caption_choice_and_json_captions(tmp_path, tok):
    write_shard(tmp_path / "0.tar", [
        {"__key__": "multi", "jpg": _jpeg((200, 0, 0)), "txt": "a red circle\n\na blue square\na green triangle\n"},
    ])
    write_shard(tmp_path / "1.tar", [
        {"__key__": "viajson", "jpg": _jpeg((0, 0, 200)), "json": json.dumps({"captions": ["a blue circle"]})},
    ])
    def captions(seed):
        it = shard_eval.make_eval_iterator(str(tmp_path / "{0,1}.tar"), batch_size=2, image_size=8, with_captions=True)
        first = next(it)["caption"]
        train = _train(str(tmp_path / "0.tar"), tok, batch_size=1, seed=seed, prefetch=0)
        return first, [int(b["text"][0, 2]) for b in _take(train, 30)]  # the colour word's id
    (first, colours_a), (_, colours_b) = captions(0), captions(0)
    assert first == ["a red circle", "a blue circle"]  # eval: first caption; json fallback
    assert colours_a == colours_b and len(set(colours_a)) == 3  # one line per epoch, chosen by seed


# ----------------------------------------------------------------------------- image ops


def test_inception_crop_box_follows_clipa_ranges():
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (300, 900), (50, 50)]:
        for _ in range(200):
            x, y, cw, ch = crops.sample_distorted_box(w, h, rng, (0.4, 1.0))
            assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h
            if (cw, ch) != (w, h):
                assert 0.4 <= cw * ch / (w * h) <= 1.0
                assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
    # A 2:1 image cannot hold a 100 % crop with aspect <= 4/3: fallback to the whole image.
    assert crops.sample_distorted_box(200, 100, rng, (1.0, 1.0)) == (0, 0, 200, 100)


def test_decode_ops_orientation_and_bad_bytes():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100, 0] = 255  # left half red
    img[:, 100:, 2] = 255  # right half blue
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    data = buf.getvalue()
    out = crops.decode_inception_crop(data, 16, np.random.default_rng(0), area_min=100)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, :7, 0].min() > 240 and out[:, :7, 2].max() < 15 and out[:, 9:, 2].min() > 240
    centre = crops.decode_resize_small_crop(data, 16)  # 100x200 -> 16x32 -> centre 16x16
    assert centre.shape == (16, 16, 3) and centre[:, :7, 0].min() > 240 and centre[:, 9:, 2].min() > 240
    fast = crops.decode_inception_crop(_jpeg((0, 200, 0), (800, 600)), 16, np.random.default_rng(0), fast_decode=True)
    assert abs(int(fast[..., 1].mean()) - 200) < 4
    with pytest.raises(DecodeError):
        crops.decode_inception_crop(b"\xff\xd8 nope", 16, np.random.default_rng(0))
    # Draft decoding really decodes smaller (800x600 -> 200x150, still >= 150x120) and keeps the crop.
    photo = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 8, 3), np.uint8))
                       .resize((800, 600), Image.Resampling.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95)
    img = open_image(buf.getvalue())
    assert draft_decode(img, 150, 120) == (0.25, 0.25) and img.size == (200, 150)
    for one_pass in (False, True):
        full = crops.resize_small_centre_crop(open_image(buf.getvalue()), 64, 48, one_pass=one_pass)
        drafted = crops.resize_small_centre_crop(open_image(buf.getvalue()), 64, 48, one_pass=one_pass, draft=True)
        assert drafted.size == full.size == (48, 48)
        assert np.abs(np.asarray(drafted, float) - np.asarray(full, float)).mean() < 3


# ----------------------------------------------------------------------------- eval


def test_eval_iterator_two_processes(scenes, tok):
    all_eval = {s.key: json.loads(s.json) for p in expand_pattern(scenes["eval_pattern"])
                for s in iter_shard(p)}
    seen, lengths = {}, []
    for p in range(2):
        it = shard_eval.make_eval_iterator(scenes["eval_pattern"], batch_size=7, image_size=S, tokenizer=tok,
                                           process_index=p, process_count=2, label_key="label", with_captions=True,
                                           with_keys=True)
        batches = list(it)
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape == (7, S, S, 3) and b["text"].shape == (7, 16)
            m = b["mask"]
            assert not b["image"][~m].any() and (b["label"][~m] == -1).all() and not b["text"][~m].any()
            for key, label, caption in zip(np.array(b["key"])[m], b["label"][m], np.array(b["caption"])[m]):
                k = key.rsplit(":", 1)[1]
                assert k not in seen and label == all_eval[k]["label"] and caption == all_eval[k]["caption"]
                seen[k] = label
        assert it.stats()["samples"] == [20, 16][p]  # eval shards hold 20 and 16 scenes
    assert set(seen) == set(all_eval) and lengths == [3, 3]


# ----------------------------------------------------------------------------- synthetic scenes


def test_synth_scenes_shards_and_held_out_task(scenes, tmp_path):
    classes, held = scenes["classes"], scenes["held_out"]
    assert len(classes) >= 10 and set(held) == set(classes)
    for split, pattern in (("train", scenes["train_pattern"]), ("eval", scenes["eval_pattern"])):
        for path in expand_pattern(pattern):
            for s in iter_shard(path):
                meta = json.loads(s.json)
                assert np.asarray(Image.open(io.BytesIO(s.image))).shape == (32, 32, 3)
                caption = s.text.decode()
                assert meta["caption"] == caption and meta["colour"] in caption and meta["shape"] in caption
                assert classes[meta["label"]] == f"{meta['colour']} {meta['shape']}"
                is_held = [meta["size"], meta["position"]] in held[meta["class"]]
                assert is_held == (split == "eval"), (split, s.key, meta)
    tok = Tokenizer(scenes["vocab"], 16)
    prompts = [t.format(c) for c in classes for t in scenes["templates"]]
    assert not (tok(prompts) == 100).any()  # no [UNK] in any zero-shot prompt
    # The vocab's corpus: every train caption in shard order, then the prompts; no eval caption.
    train_captions = [s.text.decode() for p in expand_pattern(scenes["train_pattern"]) for s in iter_shard(p)]
    with open(scenes["captions"], encoding="utf-8") as f:
        assert f.read().splitlines() == train_captions + prompts
    assert synth_scenes.vocab_command("D") == "python -m crate_jax.text.tokenizer --corpus D/captions.txt " \
        f"--out D/vocab.txt --size {synth_scenes.VOCAB_SIZE}"
    # Deterministic by seed: the same shard bytes again.
    again = synth_scenes.generate(tmp_path, train_samples=20, eval_samples=1, samples_per_shard=20, image_size=32,
                                  seed=3)
    first_train = expand_pattern(scenes["train_pattern"])[0]
    assert (tmp_path / "train" / "00000.tar").read_bytes() == open(first_train, "rb").read()
    assert again["held_out"] == held


def test_synth_scene_pixels_show_the_object():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle"):
        img, _ = synth_scenes.render_scene(rng, "red", shape, "large", "top left", 64, max_clutter=2)
        px = img.astype(int)
        red = (px[..., 0] > 150) & (px[..., 1] < 90) & (px[..., 2] < 90)
        ys, xs = np.nonzero(red)
        # A large object (diameter ~0.42 x 64 px) centred near (16, 16), and nothing red elsewhere.
        assert 200 < red.sum() < 900, (shape, red.sum())
        assert abs(ys.mean() - 16) < 5 and abs(xs.mean() - 16) < 5 and ys.max() < 36 and xs.max() < 36


# ----------------------------------------------------------------------------- TFDS layout and converter


def _tiny_tfds(data_dir):
    """A CLIPA-style TFDS dataset (features jpg + txt) built by a custom GeneratorBasedBuilder."""
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "jpg": tfds.features.Image(encoding_format="jpeg"), "txt": tfds.features.Text(),
                "label": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"full": self._generate_examples()}

        def _generate_examples(self):
            for i in range(23):
                # Encoded bytes: encoding arrays would need TensorFlow.
                yield f"k{i}", {"jpg": io.BytesIO(_jpeg((10 * i, 100, 200 - 5 * i), (30, 20 + i))),
                                "txt": f"a red circle {i}", "label": i}

    tfds.disable_progress_bar()
    builder = TinyCaptions(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir


def test_tfds_layout_reader(tmp_path, tok):
    data_dir = _tiny_tfds(tmp_path)
    make = lambda **kw: tfds_captions.make_train_iterator(  # noqa: E731
        data_dir, split="full", batch_size=4, image_size=S, tokenizer=tok, seed=0, num_threads=2,
        with_keys=True, **kw)
    seen = []
    for p in range(2):
        it = make(process_index=p, process_count=2)
        keys = [k for b in (next(it) for _ in range(6)) for k in b["key"]]
        epoch = keys[: 12 - p]  # process 0 gets 12 of the 23 examples, process 1 gets 11
        assert len(set(epoch)) == len(epoch)
        seen.append(set(epoch))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {str(i) for i in range(23)}
    full = [next(it) for it in [make()] for _ in range(5)]
    head_it = make()
    head = [next(head_it) for _ in range(2)]
    tail_it = make()
    tail_it.set_state(json.loads(json.dumps(head_it.get_state())))
    for x, y in zip(full, head + [next(tail_it) for _ in range(3)]):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
    ev = tfds_captions.make_eval_iterator(data_dir, split="full", batch_size=5, image_size=S, tokenizer=tok,
                                          process_index=1, process_count=2, label_key="label")
    batches = list(ev)
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    src = tfds_captions.open_source(data_dir, "full")  # TFDS shuffled the examples when writing
    assert len(batches) == ev.num_batches == 3 and labels.tolist() == [int(src[i]["label"]) for i in range(11, 23)]
    with pytest.raises(ValueError, match="no split 'train'"):
        tfds_captions.open_source(data_dir, "train")


def test_arrayrecord_converter_round_trip(scenes, damaged, tmp_path, tok):
    pattern = [scenes["train_pattern"], damaged[0]]
    result = arrayrecord_convert.convert(pattern, tmp_path / "ar")
    tar_samples = [s for p in expand_pattern(pattern) for s in _readable(p)
                   if s.image is not None and s.text is not None]
    assert result["num_examples"] == len(tar_samples) == 120 + len(damaged[1]) + 1  # + g03 (image not verified)
    assert result["stats"]["bad_shards"] == 3 and result["stats"]["truncated_shards"] == 1
    src = tfds_captions.open_source(tmp_path / "ar", "train")
    assert len(src) == len(tar_samples)
    for i in (0, 57, 119, len(src) - 1):  # written in shard order, bytes unchanged
        ex, s = src[i], tar_samples[i]
        assert ex["jpg"] == s.image and ex["txt"] == s.text and ex["key"].decode().endswith("/" + s.key)
    it = tfds_captions.make_train_iterator(tmp_path / "ar", batch_size=8, image_size=S, tokenizer=tok,
                                           num_threads=2)
    batches = [next(it) for _ in range(18)]
    assert it.stats()["bad_images"] >= 1 and batches[0]["image"].shape == (8, S, S, 3)  # g03 skipped


def _readable(path):
    try:
        yield from iter_shard(path)
    except ShardError:
        pass
