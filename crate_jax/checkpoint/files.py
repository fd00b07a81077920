"""Reading a user's `.npy` input with errors that say what the file is instead (`read_npy`), and writing
files that others will read: atomically (a temporary sibling renamed into place, so a
failure never leaves a half-written output) and with the permissions the user's umask gives a new
file, not the 0600 / 0700 that `tempfile` uses for its private temporaries. Bundles and exported
weights are meant to be shared."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike) -> None:
    """Gives `path` (and, for a directory, everything below it) the usual permissions: 0666 & ~umask for
    files, 0777 & ~umask for directories."""
    mask = _umask()
    path = Path(path)
    targets = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """`with atomic_file(p) as f: f.write(...)`: `p` appears complete, with the usual permissions, or not
    at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        make_shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike):
    """`with atomic_dir(d) as tmp: ...write into tmp...`: `d` is replaced by the finished `tmp` (with the
    usual permissions) only if the block succeeds."""
    import shutil
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        make_shareable(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_npy(path: str | os.PathLike, what: str, flag: str, error: type[Exception] = ValueError) -> np.ndarray:
    """A `.npy` array, memory-mapped; `error(message)` when `path` is missing, a `.npz`, not NumPy, or unreadable.
    `what` is what the array holds (e.g. 'int tokens [B, T]'), `flag` the option that takes it ('tokens')."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file (expected a .npy array of {what})")
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:4] == b"PK\x03\x04":
        raise error(f"{path} is a .npz (zip) archive; --{flag} takes one .npy array (np.save, not np.savez)")
    if head != b"\x93NUMPY":
        raise error(f"{path} is not a .npy file (no NumPy header); save the {flag} with np.save")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read the .npy array: {e}") from e
