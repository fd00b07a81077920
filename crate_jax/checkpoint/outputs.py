"""The one output contract of every command that writes: an output never eats an input, and `--overwrite`
swaps outputs so that the name always holds the complete old output or the complete new one.

* `check_output(output, inputs, workdirs=...)`: refuses (exit 2) an output that is, contains or lies inside
  anything the command reads. Paths are compared after resolving `~`, relative parts and symlinks; `gs://`
  paths are compared as strings.
* `check_destination(path, directory=..., overwrite=...)`: the cheap start-up check: refuses a path under a
  file, a file where a directory goes (or the reverse), and an existing non-empty output without
  `overwrite`. Commands call both before loading anything heavy.
* `atomic_output_dir(path)` / `atomic_output_file(path)`: the new output is written completely to a hidden
  temporary sibling `.NAME.tmp-PID-*`, then swapped in. A file is replaced by one atomic `os.replace`; a
  directory by one atomic `renameat2(RENAME_EXCHANGE)` with the temporary sibling (Linux, where the file
  system has it), after which the old one is removed. Otherwise, and with `keep_old`, the old output is
  renamed aside to `.NAME.old-STAMP`, the new one renamed into place, and only then the old one removed
  (or, with `keep_old`, kept as the visible `NAME.old-STAMP`).

Killed runs: before writing, the leftovers of earlier runs on the same NAME are handled. A `.NAME.old-*`
while NAME is missing means a kill fell between the two renames: it is the complete old output and is
renamed back to NAME. Temporary siblings of processes that no longer run are removed, and so are hidden old
outputs once NAME holds the new one (a killed `keep_old` swap's is made visible instead). Each is reported
on stderr as a `note:` line.

Testing hook: with the environment variable `CRATE_JAX_KILL_AT=N` the process ends itself with
`os._exit(137)` (what SIGKILL leaves) right before the N-th rename or remove of a swap, so tests can kill
a command at every file operation of the swap and check what the name holds afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from crate_jax import errors
from crate_jax.checkpoint.files import make_shareable

KILL_ENV = "CRATE_JAX_KILL_AT"
_KEEP = "-keep"  # suffix of a hidden old output that a keep_old swap will make visible
_ops_done = 0


class OutputError(errors.UsageError):
    """An output that would overwrite an input, or that cannot be written where it was asked (exit 2)."""


def _is_remote(p) -> bool:
    return "://" in str(p)


def _resolved(p) -> Path | str:
    if _is_remote(p):
        return str(p).rstrip("/")
    return Path(os.path.expanduser(os.fspath(p))).resolve()


def _relation(out, src) -> str | None:
    """How output `out` overlaps source `src` (both from `_resolved`), or None."""
    if isinstance(out, str) or isinstance(src, str):
        if not (isinstance(out, str) and isinstance(src, str)):
            return None
        if out == src:
            return "is"
        if src.startswith(out + "/"):
            return "contains"
        if out.startswith(src + "/"):
            return "lies inside"
        return None
    if out == src:
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "lies inside"
    return None


def check_output(output, inputs: Iterable = (), *, workdirs: Iterable = (), flag: str = "output") -> None:
    """Raises `OutputError` if `output` equals, contains or lies inside any of `inputs` (paths the command
    reads; None entries are skipped) or `workdirs` (training workdirs it reads)."""
    out = _resolved(output)
    for what, paths in (("input", inputs), ("training workdir", workdirs)):
        for src in paths:
            if src is None or str(src) == "":
                continue
            rel = _relation(out, _resolved(src))
            if rel is not None:
                fix = {"is": "another path", "contains": f"a path that does not hold {src}",
                       "lies inside": f"a path outside {src}"}[rel]
                raise OutputError(f"--{flag} {output} {rel} the {what} {src}: writing it would destroy what the "
                                  f"command reads; choose {fix}")


def _under_a_file(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_destination(path, *, directory: bool, overwrite: bool = False, flag: str = "output",
                      marker: str | None = None) -> None:
    """The start-up check of an output: not under a file, the right kind (a directory output on a file is
    refused, and the reverse, even with `overwrite`), and no existing non-empty output without `overwrite`.
    With `marker`, an existing non-empty directory is replaced only if it holds that file (an earlier output
    of the same command), never a folder of other files."""
    if _is_remote(path):
        return
    p = Path(os.path.expanduser(os.fspath(path))).absolute()
    blocker = _under_a_file(p)
    if blocker is not None:
        raise OutputError(f"--{flag} {path}: {blocker} is a file, so nothing can be written under it; choose "
                          f"another path")
    if not os.path.lexists(p):
        return
    if directory and not p.is_dir():
        raise OutputError(f"--{flag} {path} is a file; the output is a directory: choose another path")
    if not directory and p.is_dir():
        raise OutputError(f"--{flag} {path} is a directory; the output is a file: name a file (e.g. "
                          f"{Path(path) / ('out' + (p.suffix or '.npy'))})")
    if directory and not any(p.iterdir()):
        return
    if directory and marker and not (p / marker).exists():
        raise OutputError(f"--{flag} {path} holds other files (it is not an earlier output: no {marker}); choose a "
                          f"new or empty directory")
    if not overwrite:
        raise OutputError(f"--{flag} {path} exists; choose another output or pass --overwrite (add --keep-old "
                          f"to keep the old one as {p.name}.old-STAMP)")


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def _op(fn, *args) -> None:
    """One rename / remove of a swap; the kill hook (module docstring) fires right before it."""
    global _ops_done
    _ops_done += 1
    at = os.environ.get(KILL_ENV)
    if at and at.strip().isdigit() and int(at) == _ops_done:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(137)
    fn(*args)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _tmp_pid(name: str, prefix: str) -> int | None:
    """The writer's pid in `.NAME.tmp-PID-xxxx` (None for the older `.NAME.tmp-xxxx` names)."""
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _old_pid_alive(name: str) -> bool:
    """Whether the writer of `.NAME.old-DATE-TIME-PID[-keep]` still runs (then its swap is under way)."""
    pid = name.removesuffix(_KEEP).rsplit("-", 1)[-1]
    return pid.isdigit() and _pid_alive(int(pid))


def _stamp() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def recover(path) -> None:
    """Handles the leftovers of killed writes of `path` (module docstring). Safe to call any time."""
    path = Path(path)
    parent, name = path.parent, path.name
    if not parent.is_dir():
        return
    tmp_prefix, old_prefix = f".{name}.tmp-", f".{name}.old-"
    olds = sorted(p for p in parent.iterdir() if p.name.startswith(old_prefix) and not _old_pid_alive(p.name))
    if olds and not os.path.lexists(path):
        newest = olds.pop()
        os.rename(newest, path)
        _note(f"restored {path} from {newest.name}, the complete previous output that a killed run had set "
              f"aside")
    for p in olds:
        if p.name.endswith(_KEEP):
            kept = parent / f"{name}.old-{p.name[len(old_prefix):-len(_KEEP)]}"
            os.rename(p, kept)
            _note(f"kept the previous output of a killed --keep-old run as {kept}")
        else:
            _remove(p)
            _note(f"removed leftover previous output {p} (a killed run had already put the new one in place)")
    for p in parent.iterdir():
        if p.name.startswith(tmp_prefix):
            pid = _tmp_pid(p.name, tmp_prefix)
            if pid is not None and _pid_alive(pid):
                continue  # another run is writing it now
            _remove(p)
            _note(f"removed leftover temporary {p} (from a killed or failed run)")


def _prepare(path, *, directory: bool, overwrite: bool) -> Path:
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    check_destination(path, directory=directory, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    check_destination(path, directory=directory, overwrite=overwrite)  # a restored old output counts
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or
    file system cannot, and nothing was changed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap(tmp: Path, path: Path, *, keep_old: bool, replace_file: bool = False) -> None:
    if not os.path.lexists(path):
        _op(os.rename, tmp, path)
        return
    if replace_file and not keep_old:  # one atomic step: the name never goes missing
        _op(os.replace, tmp, path)
        return
    if not keep_old:
        # One atomic exchange where the system has it: readers see the old or the new output at every instant;
        # the old one then sits under the temporary name, which a killed run's successor removes.
        swapped = []
        _op(lambda: swapped.append(_exchange(tmp, path)))
        if swapped[0]:
            _op(_remove, tmp)
            return
    stamp = _stamp()
    aside = path.parent / f".{path.name}.old-{stamp}{_KEEP if keep_old else ''}"
    _op(os.rename, path, aside)
    _op(os.rename, tmp, path)
    if keep_old:
        kept = path.parent / f"{path.name}.old-{stamp}"
        _op(os.rename, aside, kept)
        _note(f"kept the previous output as {kept}")
    else:
        _op(_remove, aside)


@contextlib.contextmanager
def atomic_output_dir(path, *, overwrite: bool = False, keep_old: bool = False):
    """`with atomic_output_dir(d, overwrite=...) as tmp: ...write into tmp...`: afterwards `d` holds the
    finished directory (with the user's umask permissions); if the block fails, `d` is untouched."""
    path = _prepare(path, directory=True, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        make_shareable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap(tmp, path, keep_old=keep_old)


@contextlib.contextmanager
def atomic_output_file(path, mode: str = "wb", *, overwrite: bool = False, keep_old: bool = False):
    """`with atomic_output_file(p, overwrite=...) as f: f.write(...)`: `p` appears complete, with the user's
    umask permissions, or not at all; an old `p` is replaced only once the new one is complete."""
    path = _prepare(path, directory=False, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        make_shareable(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _swap(tmp, path, keep_old=keep_old, replace_file=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """`with atomic_file(p) as f: f.write(...)`: `p` appears complete, with the usual permissions, or not
    at all; an existing `p` is replaced (`outputs.atomic_output_file` with `overwrite=True`)."""
    with atomic_output_file(path, mode, overwrite=True) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike):
    """`with atomic_dir(d) as tmp: ...write into tmp...`: `d` is replaced by the finished `tmp` (with the
    usual permissions) only if the block succeeds (`outputs.atomic_output_dir` with `overwrite=True`)."""
    with atomic_output_dir(directory, overwrite=True) as tmp:
        yield tmp
