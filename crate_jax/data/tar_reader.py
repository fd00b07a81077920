"""Reading webdataset tar shards (DataComp / img2dataset layout) into raw samples, resumable by offset.

A shard is a tar file whose members are grouped into samples by key: ``{key}.jpg`` (or
``.jpeg/.png/.webp``), ``{key}.txt`` (the caption) and ``{key}.json`` (metadata), consecutive in the
archive. The key is the member path up to the first dot of its file name (the webdataset rule).
The reader parses tar headers itself (not ``tarfile``) so that it can start at any sample's byte
offset, skip unwanted members without reading them, and say exactly where a damaged shard fails.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from crate_jax.data.shard_patterns import open_shard

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512


class ShardError(Exception):
    """A shard could not be read. ``kind`` is 'bad' (cannot open / not a tar) or 'truncated'
    (ends early, is corrupt or fails to read after some members were read). ``offset`` is the start
    of the entry that failed: reading again from there fails the same way."""

    def __init__(self, kind: str, message: str, offset: int = 0):
        super().__init__(message)
        self.kind, self.offset = kind, offset


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes.
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    return stored in (unsigned, signed)


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    pos, path = 0, None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


@dataclass
class _Member:
    name: str
    start: int  # offset of the first header block of this entry (pax/longname headers included)
    data: bytes | None  # None when the member's extension is not wanted (data skipped)


def _iter_members(f: BinaryIO, pos: int, path: str, wanted: frozenset[str]):
    """Regular-file members from byte offset ``pos`` (the file is positioned there) to the
    end-of-archive marker; the generator returns the marker's offset.

    Raises ShardError('bad') if the very first header of the file is not a tar header, and
    ShardError('truncated') if the archive ends early, a header is corrupt, data is short or a
    read fails.
    """
    entry_start, long_name = pos, None
    while True:
        try:
            header = _read_exact(f, _BLOCK)
        except OSError as e:
            raise ShardError("truncated", f"{path}: read error at byte {pos} ({e})", entry_start) from e
        if len(header) < _BLOCK:
            if pos == 0 and not header:
                raise ShardError("bad", f"{path}: empty file")
            raise ShardError("truncated", f"{path}: ends at byte {pos + len(header)} without the "
                                          "tar end-of-archive marker", entry_start)
        if header == b"\0" * _BLOCK:
            return pos
        if not _checksum_ok(header):
            if pos == 0:
                raise ShardError("bad", f"{path}: invalid tar header at byte 0 (not a tar file?)")
            raise ShardError("truncated", f"{path}: invalid tar header at byte {pos}", entry_start)
        size = _octal(header[124:136])
        typeflag = header[156:157]
        name = _cstr(header[0:100])
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = _cstr(header[345:500]) + "/" + name
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        pos += _BLOCK
        keep = typeflag in (b"x", b"L") or (typeflag in (b"0", b"\0", b"7") and _extension(name) in wanted)
        try:
            if keep:
                data = _read_exact(f, padded)
            elif padded:  # reading past the end is caught by the next header read
                f.seek(pos + padded) if f.seekable() else _read_exact(f, padded)
        except OSError as e:
            raise ShardError("truncated", f"{path}: read error in member {name} ({e})", entry_start) from e
        if keep and len(data) < padded:
            raise ShardError("truncated", f"{path}: member {name} is cut short at byte {pos + len(data)}",
                             entry_start)
        pos += padded
        if typeflag in (b"x", b"L"):  # pax extended header / GNU long name for the next entry
            long_name = _pax_path(data[:size]) if typeflag == b"x" else _cstr(data[:size])
            continue
        if long_name is not None:
            name, long_name = long_name, None
        start, entry_start = entry_start, pos
        if typeflag not in (b"0", b"\0", b"7"):  # directories, links, pax global headers
            continue
        yield _Member(name, start, data[:size] if keep else None)


def _split_name(name: str) -> tuple[str, str]:
    """Webdataset key and extension: key is the path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    dot = base.find(".")
    if dot < 0:
        return name, ""
    key = (head + "/" if head else "") + base[:dot]
    return key, base[dot + 1 :].lower()


def _extension(name: str) -> str:
    return _split_name(name)[1]


@dataclass
class RawSample:
    """One sample as stored: encoded bytes, before any decoding.

    ``index`` is the sample's position in its shard; ``start`` / ``next_start`` are the byte
    offsets of its first header and of the next sample's first header.
    """

    shard: int
    path: str
    key: str
    index: int
    start: int
    next_start: int
    image: bytes | None
    text: bytes | None
    json: bytes | None


_WANTED = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))


def iter_shard(path: str, shard: int = 0, start: int = 0, index: int = 0) -> Iterator[RawSample]:
    """Samples of one shard, from byte offset ``start`` (a sample boundary; ``index`` is its number).

    Raises ShardError after yielding what could be read if the shard is unreadable or truncated.
    The sample before the damage gets ``next_start`` = the damaged entry, so a reader resumed there
    meets the same error.
    """
    try:
        f = open_shard(path)
        if start:
            f.seek(start)
    except Exception as e:  # missing file, permission, network: the shard is unusable.
        raise ShardError("bad", f"{path}: cannot open ({type(e).__name__}: {e})") from e
    try:
        group: dict[str, Any] | None = None
        members = _iter_members(f, start, path, _WANTED)
        while True:
            try:
                m = next(members)
            except StopIteration as stop:
                end = stop.value
                break
            except ShardError as e:
                if group is not None:  # every member in the group was read completely: keep it.
                    yield _make_sample(group, shard, path, index, e.offset)
                raise
            key, ext = _split_name(m.name)
            if group is not None and key != group["key"]:
                yield _make_sample(group, shard, path, index, m.start)
                index += 1
                group = None
            if group is None:
                group = {"key": key, "start": m.start}
            if m.data is not None:
                if ext in IMAGE_EXTENSIONS:
                    group.setdefault("image", m.data)
                else:
                    group[ext] = m.data
        if group is not None:
            yield _make_sample(group, shard, path, index, end)
    finally:
        f.close()


def _make_sample(group: Mapping[str, Any], shard: int, path: str, index: int, next_start: int) -> RawSample:
    return RawSample(shard, path, group["key"], index, group["start"], next_start,
                     group.get("image"), group.get("txt"), group.get("json"))


def count_samples(path: str) -> int:
    """Number of samples (distinct consecutive keys) in a shard, reading headers only."""
    n, last = 0, None
    f = open_shard(path)
    try:
        for m in _iter_members(f, 0, path, frozenset()):
            key = _split_name(m.name)[0]
            if key != last:
                n, last = n + 1, key
    finally:
        f.close()
    return n
