"""Reading a user's `.npy` input with errors that say what the file is instead (`read_npy`), and writing
files that others will read: atomically (`crate_jax.checkpoint.outputs`: a temporary sibling swapped
into place, so a failure or a kill never leaves a half-written output) and with the permissions the
user's umask gives a new file, not the 0600 / 0700 that `tempfile` uses for its private temporaries.
Bundles and exported weights are meant to be shared."""

from __future__ import annotations

import os
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
