"""Shard lists and shard files: brace / glob patterns expanded to paths, and paths opened for reading.

A pattern is bash-style (``gs://b/d/{00000..01023}.tar``, ``a{0,1}.tar``, ``*.tar``); several
patterns may be joined by ``::`` or by commas outside braces. Paths are local files or any fsspec
URL (``gs://`` needs gcsfs); :func:`check_filesystems` fails early, naming the package to install.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from typing import BinaryIO

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _matching_brace(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(s):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    parts.append(s[start:])
    return parts


def _range_values(m: re.Match) -> list[str]:
    a_text, b_text, step_text = m.groups()
    a, b = int(a_text), int(b_text)
    step = abs(int(step_text)) if step_text else 1
    step = step or 1
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    padded = any(re.match(r"^-?0\d", t) for t in (a_text, b_text))
    width = max(len(a_text), len(b_text)) if padded else 0
    return [f"{v:0{width}d}" for v in values]


def _expand(s: str, start: int) -> list[str]:
    i = s.find("{", start)
    while i >= 0:
        j = _matching_brace(s, i)
        if j < 0:
            return [s]
        body = s[i + 1 : j]
        parts = _split_top_level(body)
        if len(parts) > 1:
            out = []
            for part in parts:
                out.extend(_expand(s[:i] + part + s[j + 1 :], i))
            return out
        m = _RANGE.match(body)
        if m:
            out = []
            for v in _range_values(m):
                out.extend(_expand(s[:i] + v + s[j + 1 :], i + len(v)))
            return out
        i = s.find("{", i + 1)  # '{x}' with no comma or range stays literal, as in bash.
    return [s]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a{0..2}`` -> a0 a1 a2, ``{000..002}`` keeps zero padding,
    ``{0..10..5}`` steps, ``{x,y}`` alternates, braces nest; ``{x}`` is literal."""
    return _expand(pattern, 0)


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Shard list from one or several patterns.

    ``pattern`` is a string or a list of strings. A string may hold several patterns separated by
    ``::`` (webdataset's separator) or by commas outside braces. Each pattern is brace-expanded;
    results containing ``*``, ``?`` or ``[`` are globbed (sorted). Order is kept; a shard listed twice
    is an error (it would be read twice per epoch).
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for p in patterns:
        for piece in p.split("::"):
            for sub in _split_top_level(piece):
                sub = sub.strip()
                if not sub:
                    continue
                for path in expand_braces(sub):
                    out.extend(_glob(path) if any(c in path for c in "*?[") else [path])
    if not out:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    seen: set[str] = set()
    for path in out:
        if path in seen:
            raise ValueError(f"shard {path!r} is listed twice by pattern {pattern!r}")
        seen.add(path)
    return out


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _glob(path: str) -> list[str]:
    if _is_local(path):
        found = sorted(glob.glob(_local(path)))
    else:
        fs, _, _ = _fsspec().get_fs_token_paths(path)
        proto = path.split("://", 1)[0]
        found = [p if "://" in p else f"{proto}://{p}" for p in sorted(fs.glob(path))]
    if not found:
        raise FileNotFoundError(f"shard glob {path!r} matches no files")
    return found


def _fsspec():
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with the test environment.
        raise ImportError("reading non-local shards needs fsspec: pip install fsspec") from e
    return fsspec


def check_filesystems(paths: Iterable[str]) -> None:
    """Fails early, with the package to install, if a path's protocol (e.g. ``gs://``) is unusable."""
    protocols = sorted({p.split("://", 1)[0] for p in paths if not _is_local(p)})
    for proto in protocols:
        try:
            _fsspec().get_filesystem_class(proto)
        except ImportError as e:
            extra = " (pip install gcsfs, or the crate_jax[gcs] extra)" if proto in ("gs", "gcs") else ""
            raise ImportError(f"shards with protocol {proto}:// need an fsspec backend{extra}: {e}") from e
        except ValueError as e:
            raise ValueError(f"unknown shard protocol {proto}://: {e}") from e


def open_shard(path: str) -> BinaryIO:
    """Opens a local path or an fsspec URL for binary reading (local files with a 1 MiB buffer)."""
    if _is_local(path):
        return open(_local(path), "rb", buffering=1 << 20)
    return _fsspec().open(path, "rb").open()

