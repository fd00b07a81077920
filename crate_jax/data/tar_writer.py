"""Writing webdataset tar shards: byte-identical for equal inputs, appearing atomically."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any


def write_shard(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
    """Writes a webdataset tar: each sample is ``{'__key__': str, ext: bytes | str, ...}``.

    Members are written in the given order with fixed metadata (mtime 0, mode 0644), so equal
    inputs give byte-identical shards. The file appears atomically (written to ``.tmp``, renamed).
    Returns the number of samples written.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                if "." in key.rpartition("/")[2]:
                    raise ValueError(f"sample key {key!r} has a dot in its file name; webdataset keys cannot")
                for ext, value in sample.items():
                    if ext == "__key__":
                        continue
                    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
