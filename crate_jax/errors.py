"""How every command ends: one `error:` line (or `config error:` for a config), an exit code, and a
traceback only with `--debug`.

Exit codes, the same for every command:

* 0: done;
* 2: bad input or config (`UsageError` and its kin: a missing file, a bad option, an output that would
  overwrite an input) — nothing was written;
* 3: the workdir or a stored state cannot be used as it is (`StateError`: a workdir of another run, a
  damaged checkpoint, a non-finite run, a workdir held by another run, a full disk);
* 130: stopped by Ctrl-C (SIGINT);
* 1: anything else (a bug: the line says to rerun with `--debug` and report the traceback).

`run(main, argv)` wraps a command's `main(argv) -> int`. Modules raise the exception classes below (or
their own subclasses of `ValueError` / `RuntimeError`, which `classify` maps) and never print
tracebacks themselves.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Sequence

# A config that cannot be built: the message names the key and what to change. Defined with the model configs
# (the bottom layer: models/ imports nothing outside models/), published here for every other module.
from crate_jax.models.config import ConfigError

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_STATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_FLAG = "--debug"


class UsageError(ValueError):
    """Bad input or configuration (exit 2). The message names the file, option or key and what to do."""


class StateError(RuntimeError):
    """A workdir or stored state that cannot be used as it is (exit 3). The message names the path."""


def disk_full_message(e: OSError, doing: str = "") -> str:
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    return (f"no space left on the device{where}{' while ' + doing if doing else ''}; free space (or point the "
            f"output elsewhere) and rerun: nothing complete was lost")


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when wrapped by a library (tensorstore and Orbax raise their own
    kinds whose text carries the OS error)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "ENOSPC" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(e: BaseException) -> tuple[int, str]:
    """`(exit code, message line)` for an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "error: interrupted (Ctrl-C); nothing half-written was left under an output name"
    if isinstance(e, StateError):  # its own message is the more specific one, also for a full disk
        return EXIT_STATE, f"error: {_one_line(e)}"
    if is_disk_full(e):
        return EXIT_STATE, "error: " + (disk_full_message(e) if isinstance(e, OSError) else
                                        f"no space left on the device ({_one_line(e)}); free space and rerun")
    if isinstance(e, ConfigError):
        return EXIT_USAGE, f"config error: {_one_line(e)}"
    if isinstance(e, (UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_USAGE, f"error: {_one_line(e)}"
    if isinstance(e, PermissionError):
        return EXIT_USAGE, (f"error: permission denied: {e.filename or _one_line(e)}; choose a path you can write "
                            f"to, or fix its permissions")
    return EXIT_BUG, (f"error: unexpected {type(e).__name__}: {_one_line(e)} (rerun with {DEBUG_FLAG} for the "
                      f"traceback, and please report it)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# True while a `run` started with --debug is under way: a command run inside another (`crate-jax train`
# runs train's own `run`) inherits the flag the outer one took out of the arguments.
_debug_run = False


def take_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv or _debug_run


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Calls `main(argv)` (with `--debug` taken out) and turns any exception into one line on stderr and its
    exit code (see the module docstring). `SystemExit` (argparse's usage errors, exit 2) passes through."""
    global _debug_run
    argv, debug = take_debug(argv)
    outer, _debug_run = _debug_run, debug
    try:
        code = main(argv)
        return EXIT_OK if code is None else int(code)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - this is the one place that turns failures into exit codes
        code, line = classify(e)
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        return code
    finally:
        _debug_run = outer


def exit_with(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """`if __name__ == "__main__": exit_with(main)`. After Ctrl-C the process leaves with `os._exit`, so that
    background threads (XLA compiles, Orbax writers) cannot crash the interpreter's shutdown."""
    code = run(main, argv)
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
