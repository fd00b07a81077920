"""File-tree checks shared by the tests of commands that must leave their inputs alone."""

import hashlib
from pathlib import Path


def tree_digest(path, ignore=()) -> str:
    """SHA-256 over the relative paths and bytes of every file under `path` (or of the file `path`), and the
    relative paths of the folders: equal digests mean a byte-identical tree. Names in `ignore` (any part of
    the relative path) are left out."""
    root = Path(path)
    h = hashlib.sha256()
    items = [root] if root.is_file() else sorted(root.rglob("*"))
    for p in items:
        rel = p.relative_to(root) if p != root else Path(p.name)
        if any(part in ignore for part in rel.parts):
            continue
        h.update(f"{'F' if p.is_file() else 'D'} {rel}\0".encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()
