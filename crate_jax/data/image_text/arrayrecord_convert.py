"""Convert webdataset tar shards into a TFDS-format ArrayRecord dataset (CLIPA's data layout).

``python -m crate_jax.data.image_text.arrayrecord_convert --shards 'shards/{00000..00009}.tar' --out DIR``

writes a TFDS dataset directory whose examples have the features CLIPA reads (docs/clipa.md §Recipes):
``jpg`` (the image, stored as the original encoded bytes, not re-encoded) and ``txt`` (the caption
text; several captions stay one per line), plus ``key`` (``'{shard index:06d}/{sample key}'``) and
``json`` (the raw metadata string, '' if none). ``DIR`` is the builder directory itself:
``tfds.builder_from_directory(DIR)`` opens it, and ``crate_jax.data.image_text.tfds_captions`` reads it with
random access through grain (``builder.as_data_source``). No TensorFlow is needed.

Samples are written in shard order (TFDS's write-time shuffle is off; readers shuffle globally by
index). Samples without image or caption and unreadable or truncated shards are skipped and
counted, as the tar reader does; ``--verify-images`` also decodes every image and drops the ones PIL
cannot read.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from crate_jax import errors
from crate_jax.checkpoint.outputs import atomic_output_dir, check_destination, check_output
from crate_jax.data.batching import SkipCounter
from crate_jax.data.decode import DecodeError, decode_image
from crate_jax.data.image_text.captions import parse_captions
from crate_jax.data.image_text.rows import missing, skip
from crate_jax.data.shard_patterns import check_filesystems, expand_pattern
from crate_jax.data.tar_reader import ShardError, iter_shard

BUILDER_NAME = "caption_shards"


def _builder_class():
    # Imported lazily: tfds import costs ~0.5 s and only the converter and tfds reader need it.
    import tensorflow_datasets as tfds

    class CaptionShards(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Image-text pairs converted from webdataset shards."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS's default looks the class up as a package resource and then needs the
            # `importlib_resources` backport, which is not installed; the module file is enough.
            from etils import epath

            return epath.Path(__file__)

        def __init__(self, *, paths: Sequence[str], split: str, verify_images: bool, **kwargs):
            self._paths, self._split, self._verify = list(paths), split, verify_images
            self.conversion_stats = SkipCounter()
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                disable_shuffling=True,  # keep shard order; training shuffles by index
                description="Image-text pairs converted from webdataset tar shards by "
                            "crate_jax.data.image_text.arrayrecord_convert.",
                features=tfds.features.FeaturesDict({
                    "jpg": tfds.features.Image(encoding_format="jpeg"),
                    "txt": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "json": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            for i, path in enumerate(self._paths):
                try:
                    for s in iter_shard(path, i):
                        where = f"{path}: sample {s.key!r}"
                        bad = missing(where, s.image, parse_captions(s.text, s.json))
                        if bad is None and self._verify:
                            bad = _undecodable(where, s.image)
                        if bad is not None:
                            self.conversion_stats.skip(bad["kind"], bad["error"])
                            continue
                        caption = s.text.decode("utf-8", "replace") if s.text is not None else "\n".join(
                            parse_captions(None, s.json))
                        self.conversion_stats.used("samples")
                        key = f"{i:06d}/{s.key}"
                        yield key, {"jpg": io.BytesIO(s.image), "txt": caption, "key": key,
                                    "json": (s.json or b"").decode("utf-8", "replace")}
                except ShardError as e:
                    self.conversion_stats.skip("bad_shards" if e.kind == "bad" else "truncated_shards", str(e))

    return CaptionShards


def _undecodable(where: str, data: bytes) -> dict[str, str] | None:
    """The skip marker of an image the train pipeline could not decode, else None."""
    try:
        decode_image(data)
    except DecodeError as e:
        return skip("bad_images", f"{where}: undecodable image ({e})")
    return None


def convert(pattern: str | Sequence[str], out_dir: str | os.PathLike, *, split: str = "train",
            verify_images: bool = False, overwrite: bool = False, keep_old: bool = False) -> dict[str, Any]:
    """Converts the shards of ``pattern`` into the TFDS ArrayRecord dataset directory ``out_dir``.

    Returns ``{'out_dir', 'num_examples', 'stats', 'seconds'}``.
    """
    import tensorflow_datasets as tfds

    paths = expand_pattern(pattern)
    check_filesystems(paths)
    out_dir = os.fspath(out_dir)
    check_output(out_dir, paths, flag="out")
    # --overwrite replaces an earlier dataset, never a folder of other files
    check_destination(out_dir, directory=True, overwrite=overwrite, flag="out", marker="dataset_info.json")
    t0 = time.perf_counter()
    tfds.disable_progress_bar()
    with atomic_output_dir(out_dir, overwrite=overwrite, keep_old=keep_old) as tmp:
        staging = os.path.join(tmp, ".staging")
        builder = _builder_class()(paths=paths, split=split, verify_images=verify_images, data_dir=staging,
                                   file_format="array_record")
        builder.download_and_prepare(
            download_dir=os.path.join(staging, "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        # Flatten data_dir/caption_shards/1.0.0/ into the output so that it is the builder directory.
        for name in os.listdir(builder.data_dir):
            shutil.move(os.path.join(builder.data_dir, name), os.path.join(tmp, name))
        shutil.rmtree(staging)
    num = builder.info.splits[split].num_examples
    return {"out_dir": out_dir, "num_examples": num, "stats": builder.conversion_stats.snapshot(),
            "seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
    from crate_jax.cli import tool_parser
    p = tool_parser("crate_jax.data.image_text.arrayrecord_convert", __doc__)
    p.add_argument("--shards", required=True, action="append",
                   help="shard pattern, e.g. 'shards/{00000..01023}.tar' (may repeat)")
    p.add_argument("--out", required=True, help="output dataset directory (opened with builder_from_directory)")
    p.add_argument("--split", default="train", help="name of the split written")
    p.add_argument("--verify-images", dest="verify_images", action="store_true", help="decode every image, drop unreadable ones")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier dataset in --out (swapped in only once the new one is complete)")
    p.add_argument("--keep-old", action="store_true",
                   help="with --overwrite: keep the replaced dataset beside the new one as NAME.old-STAMP")
    a = p.parse_args(argv)
    if a.keep_old and not a.overwrite:
        raise errors.UsageError("--keep-old keeps the dataset that --overwrite replaces; pass both")
    logging.basicConfig(level=logging.INFO)
    result = convert(a.shards, a.out, split=a.split, verify_images=a.verify_images, overwrite=a.overwrite,
                     keep_old=a.keep_old)
    print(f"wrote {result['num_examples']} examples to {result['out_dir']} (split {a.split!r}) in "
          f"{result['seconds']:.1f}s; skipped: "
          + (", ".join(f"{k}={v}" for k, v in result["stats"].items() if k != "samples" and v) or "none"))
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
