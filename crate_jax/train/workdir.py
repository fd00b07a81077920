"""The training workdir at start-up: is it usable, and is it ours? Both are settled before a model is
built or data opened.

`check_workdir(path)` refuses (a `StateError`, exit 3 like every other workdir problem) a path that is
a file, lies under a file, or cannot be written (the workdir itself, or its nearest existing parent when
it does not exist yet, plus the files a resumed run rewrites). Nothing is created by the check.

`WorkdirLock(path)` is held for a run's lifetime: one run per workdir. A second run is refused at once
with the holder's pid, host, start time and command, and changes nothing in the workdir.

* Local and NFS workdirs: an exclusive `fcntl.flock` on `WORKDIR/.lock`. The kernel drops it when the
  holding process dies, however it dies, so a killed run never leaves a stale lock; the file's text
  (who holds it) is only read when the lock is taken, so stale text is harmless. The file is removed
  on release; a process that locked a removed file notices (another inode at the path) and retries.
  On NFS (Linux >= 2.6.12) flock is carried out as a POSIX lock through the NFS lock manager, so it
  holds across hosts; a lock held by a crashed client is freed when its lease ends (NFSv4: about 90 s).
  A file system that refuses locks altogether (NFS without a lock manager, some FUSE mounts) gets a
  warning and no lock.
* Object stores (`gs://` workdirs) and FUSE mounts of them (gcsfuse) have no cross-host OS locks. A
  `gs://` workdir gets a best-effort lease instead: `.lock` holds the holder's details and a renewal
  time, refreshed every `LEASE_S / 3` seconds by a thread; a run is refused while a lease younger than
  `LEASE_S` exists. Two runs started within the same moment can both pass, so a warning says so. A
  killed run's lease lapses after `LEASE_S`. For a gcsfuse mount, flock only excludes runs on the same
  host: keep one launcher per workdir.
* Multi-host runs: process 0 alone takes the lock (the workdir is one shared directory; the other
  processes would only contend with their own run) and tells every process whether it got it, so a
  refused run stops on all of them before anything else happens.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from crate_jax.errors import StateError

LOCK_NAME = ".lock"
# flock's answers on file systems without locks (NFS without a lock manager, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
LEASE_S = 600.0
# Files a resumed run rewrites: each must be writable if it exists.
REWRITTEN = ("config.json", "model.json", "metrics.jsonl", "final_metrics.json", "checkpoints", "tensorboard")


def is_remote(path) -> bool:
    return "://" in str(path)


def check_workdir(path) -> None:
    """Raises `StateError` naming the path unless a run could create and write `path` (see the module
    docstring). Remote workdirs are checked by their first write."""
    if is_remote(path):
        return
    p = Path(str(path)).absolute()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise StateError(f"the workdir {p} is {'a broken link' if not p.exists() else 'a file'}, not a "
                             f"directory; choose another --workdir")
        if not os.access(p, os.W_OK | os.X_OK):
            raise StateError(f"the workdir {p} is not writable (read-only directory or file system); fix its "
                             f"permissions or choose another --workdir")
        for name in REWRITTEN:
            f = p / name
            if f.exists() and not os.access(f, os.W_OK | (os.X_OK if f.is_dir() else 0)):
                raise StateError(f"{f} is not writable, and a resumed run rewrites it; fix its permissions or "
                                 f"choose another --workdir")
        return
    parent = p.parent
    while not parent.exists():
        if parent.is_symlink():
            raise StateError(f"the workdir {p} lies under {parent}, a broken link; choose another --workdir")
        parent = parent.parent
    if not parent.is_dir():
        raise StateError(f"the workdir {p} lies under {parent}, which is a file, not a directory; choose another "
                         f"--workdir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StateError(f"the workdir {p} cannot be created: {parent} is not writable (read-only directory or file "
                         f"system); choose another --workdir")


def holder_text(command: str | None = None) -> str:
    """What the lock file says about its holder: pid, host, start time (UTC) and command."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "command": command if command is not None else " ".join(sys.argv)}) + "\n"


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return (f"pid {h['pid']} on host {h['host']}, started {h['started']} ({h.get('command', '?')}"
                + (f"; lease renewed {h['renewed']}" if "renewed" in h else "") + ")")
    except (ValueError, KeyError, TypeError):
        return "a run that has not yet recorded its details"


def _refused(workdir, text: str) -> StateError:
    return StateError(f"the workdir {workdir} is in use by another training run: {describe_holder(text)}. Wait for "
                      f"it to finish (or stop it), or choose another --workdir; nothing in the workdir was changed")


class _FileLock:
    """`flock` on a local (or NFS) lock file; see the module docstring."""

    def __init__(self, workdir: Path):
        self.workdir, self.path = workdir, workdir / LOCK_NAME
        self.fd = None

    def acquire(self, text: str) -> None:
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                held = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _refused(self.workdir, held) from None
                if e.errno in _NO_LOCKS:
                    print(f"warning: the file system of {self.workdir} does not support file locks "
                          f"({os.strerror(e.errno)}): nothing stops a second run on this workdir; start one at a "
                          f"time", file=sys.stderr, flush=True)
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                    break
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and lock: try the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # removed while still locked, so that a process waiting on the old file sees it is gone
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class _Lease:
    """Best-effort lease file for object-store workdirs; see the module docstring."""

    def __init__(self, workdir):
        from etils import epath
        self.workdir, self.path = workdir, epath.Path(str(workdir)) / LOCK_NAME
        self._stop = threading.Event()
        self._thread = None
        self._text = None

    def acquire(self, text: str) -> None:
        if self.path.exists():
            held = self.path.read_text()
            try:
                age = time.time() - float(json.loads(held)["renewed_at"])
            except (ValueError, KeyError, TypeError):
                age = 0.0
            if age < LEASE_S:
                raise _refused(self.workdir, held)
        print(f"warning: {self.workdir} is an object-store workdir: no OS lock protects it, only a best-effort lease "
              f"file ({self.path}); do not start two runs on it at once", file=sys.stderr, flush=True)
        self._text = json.loads(text)
        self._renew()
        self._thread = threading.Thread(target=self._keep, name="workdir-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        now = time.time()
        self.path.write_text(json.dumps({**self._text, "renewed_at": now,
                                         "renewed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}) + "\n")

    def _keep(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            try:
                self._renew()
            except Exception as e:  # noqa: BLE001 - a missed renewal must not kill the run
                print(f"warning: could not renew the workdir lease {self.path}: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.path.unlink()
        except Exception:  # noqa: BLE001 - a lease left behind lapses by itself
            pass


class WorkdirLock:
    """`with WorkdirLock(workdir):` one run per workdir (see the module docstring). Creates the workdir
    if needed; if the run then fails before writing anything, a workdir it created is removed again."""

    def __init__(self, workdir, *, command: str | None = None):
        self.workdir = workdir
        self.command = command
        self._lock = None
        self._created: list[Path] = []  # directories this run made, deepest first

    def __enter__(self) -> "WorkdirLock":
        import jax
        ok, problem = True, None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except StateError as e:
                ok, problem = False, e
        if not _everyone(ok):
            raise problem or StateError(f"the workdir {self.workdir} is in use by another training run (see "
                                        f"process 0's message); nothing in the workdir was changed")
        return self

    def _acquire(self) -> None:
        if is_remote(self.workdir):
            self._lock = _Lease(self.workdir)
        else:
            p = Path(str(self.workdir)).absolute()
            self._created = [d for d in (p, *p.parents) if not d.exists()]
            p.mkdir(parents=True, exist_ok=True)
            self._lock = _FileLock(p)
        try:
            self._lock.acquire(holder_text(self.command))
        except BaseException:
            self._lock = None
            self._remove_if_unused()
            raise

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """Directories this run created and left empty (it failed before writing) go again."""
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []


def _everyone(ok: bool) -> bool:
    import jax
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
