"""Training checkpoints: Orbax CheckpointManager with the train state and, beside it, each process's
data-iterator position (so a resumed run sees exactly the batches it would have seen).

Layout: `WORKDIR/checkpoints/<step>/{state,data}/`. Orbax commits a step by an atomic rename of
`<step>.orbax-checkpoint-tmp*` plus a `commit_success.txt`, so a save killed half-way is never
restored. On resume, the newest step is checked before it is used:

* damaged or incomplete (no commit marker, missing `_CHECKPOINT_METADATA` / `_METADATA`, truncated
  array files, an unreadable data-iterator file): the step is **set aside**, i.e. moved, never
  deleted, to `WORKDIR/checkpoints.set_aside/<step>-<time>/` with a `REASON.txt`, a warning is
  printed, and the next older step is tried. Saving that step again later cannot collide with it.
* a data-iterator state that parses but is not what the iterator writes (the caller's `use_data`
  check says so): set aside the same way.
* written by a different run (other parameter shapes or state structure, another number of
  processes, another data stream): a `CheckpointError` saying what differs; nothing is touched.

A save that fails (a full disk, most often) raises a `CheckpointError` naming the step whose save
failed, also when an asynchronous save fails in the background and surfaces at the next save or wait.
Nothing committed is lost: the half-written `<step>.orbax-checkpoint-tmp*` is removed by the next run,
which resumes from the newest committed step. `CRATE_JAX_TEST_DISK_FULL_AT_STEP=s` makes the save of
step `s` fail with ENOSPC, for the fault tests.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from crate_jax import errors

log = logging.getLogger(__name__)


def as_path(path) -> epath.Path:
    """A workdir as an `epath.Path`: `gs://...` stays a bucket path, a local path becomes absolute
    (Orbax requires absolute checkpoint paths)."""
    s = str(path)
    return epath.Path(s) if "://" in s else epath.Path(Path(s).absolute())


def committed_steps(directory) -> list[int]:
    """Steps under a `checkpoints/` directory that Orbax finished writing: a directory named by the step
    number (Orbax renames `<step>.orbax-checkpoint-tmp*` into place when a save commits) that holds its
    `_CHECKPOINT_METADATA` and its commit marker. Anything else (a temporary directory, a step whose
    metadata is gone) is not a checkpoint."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and p.is_dir() and (p / "_CHECKPOINT_METADATA").exists()
                  and (p / COMMIT_MARKER).exists())


# A per-process JSON item: every process writes its own file into the step directory before commit.
class ProcessJsonHandler(ocp.CheckpointHandler):
    def save(self, directory: epath.Path, args: "ProcessJsonSave"):
        _maybe_fail_for_test(directory)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.item))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore" = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            if any(f.startswith("process_") and not f.endswith(f"-of-{jax.process_count()}.json") for f in found):
                raise ProcessCountMismatch(
                    f"{path} is missing (found {found}): the checkpoint was written by a run with a different number "
                    f"of processes, so each process's data position cannot be restored; resume with the same "
                    f"number of processes")
            raise FileNotFoundError(f"{path} is missing (found {found})")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


class CheckpointError(errors.StateError):
    """A checkpoint directory that cannot be used or written as it is (exit 3); the message says why."""


class ProcessCountMismatch(CheckpointError):
    pass


COMMIT_MARKER = "commit_success.txt"
_STRUCTURE_MISMATCH = "tree structures do not match"  # Orbax's words for a restore target of another layout
SET_ASIDE = ".set_aside"  # suffix of the sibling directory damaged steps are moved to


def _abstract_leaves(tree) -> list[tuple[str, tuple]]:
    return [(jax.tree_util.keystr(p), tuple(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _saved_leaves(tree) -> list[tuple[str, tuple]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return [(getattr(x, "name", jax.tree_util.keystr(p)), tuple(x.shape)) for p, x in leaves]


class TrainCheckpointer:
    """Async saves every `every` steps; keeps the last `keep` plus every `keep_period`-th step."""

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        # Handlers named up front, so that a fresh manager can read a step's metadata before restoring it.
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                            "data": ProcessJsonHandler()})
        self._in_flight: int | None = None  # the step of a save that may still be writing
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ProcessJsonSave(data_state)
        try:  # Orbax first waits for the previous save: its failure surfaces here too
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 - tensorstore / Orbax / the OS raise many kinds
            raise self._save_failed(e, step) from e
        if saved:
            self._in_flight = step
        return saved

    def _save_failed(self, e: BaseException, step: int | None) -> CheckpointError:
        """The error for a failed save: names the step whose save failed (the one still in flight, if it
        never committed, else `step`) and the newest committed step a rerun resumes from."""
        self._failed = True
        failed = step
        if self._in_flight is not None and self._in_flight not in committed_steps(self.directory):
            failed = self._in_flight
        self._in_flight = None
        good = [s for s in committed_steps(self.directory) if failed is None or s < failed]
        resume = (f"a rerun resumes from step {good[-1]}, the newest complete checkpoint" if good else
                  "no complete checkpoint exists yet, so a rerun starts from step 0")
        what = (f"no space left on the device under {self.directory}" if errors.is_disk_full(e) else
                f"{type(e).__name__}: {_first_line(e)}")
        which = f"the checkpoint of step {failed}" if failed is not None else "a checkpoint"
        return CheckpointError(f"{which} could not be written ({what}); free space (or fix "
                               f"the cause) and rerun the same command: {resume}. Nothing committed was lost")

    def has_steps(self) -> bool:
        """Whether any step directory exists (committed or not): a workdir that holds a run."""
        return bool(self._step_dirs())

    def restore(self, abstract_state, *, with_data: bool = True,
                use_data: Callable[[Any, Any], str | None] | None = None) -> tuple[int, Any, dict | None] | None:
        """Restores the newest restorable step onto the shardings in `abstract_state` (ShapeDtypeStructs),
        setting aside damaged steps on the way (see the module docstring). `use_data(step_dir, data_state)`,
        if given, applies a restored data-iterator state and returns None, or says why the state is damaged
        (the step is set aside), or raises `CheckpointError` for another run's state. Returns `(step, state,
        data_state)`, or None when the directory holds no checkpoint at all. Raises `CheckpointError` when
        the newest intact step belongs to another run, or when every step was damaged."""
        self.manager.reload()
        set_aside = []
        for step in self._step_dirs():
            problem = self._incomplete(step, with_data)
            if problem is None:
                self._check_compatible(step, abstract_state)  # raises CheckpointError for another run's step
            out = None
            if problem is None:
                try:
                    args = {"state": ocp.args.StandardRestore(abstract_state)}
                    if with_data:
                        args["data"] = ProcessJsonRestore()
                    out = self.manager.restore(step, args=ocp.args.Composite(**args))
                except ProcessCountMismatch as e:
                    raise CheckpointError(f"{self.directory / str(step)}: {e}") from None
                except Exception as e:  # noqa: BLE001 - tensorstore / orbax / json raise many kinds
                    if _STRUCTURE_MISMATCH in str(e):  # intact, but another run's state layout
                        raise CheckpointError(self._other_run(step, " ".join(str(e).split())[:600])) from None
                    problem = f"cannot be read: {type(e).__name__}: {_first_line(e)}"
            other_run = None
            if problem is None and with_data and use_data is not None:
                try:
                    problem = use_data(self.directory / str(step), out["data"])
                except CheckpointError as e:
                    other_run = e
            if not _agree(other_run is None):  # every process stops, before anything is set aside
                raise other_run or CheckpointError(f"{self.directory / str(step)}: another process found a "
                                                   f"data-iterator state of another run; nothing was changed")
            if not _agree(problem is None):  # a step is used only if every process could read it
                problem = problem or "cannot be read by another process"
            if problem is None:
                return step, out["state"], (out["data"] if with_data else None)
            set_aside.append(self._set_aside(step, problem))
        if set_aside:  # never silently start from scratch over checkpoints that existed
            raise CheckpointError(
                f"every checkpoint in {self.directory} was damaged and has been set aside ({', '.join(set_aside)}); "
                f"nothing is left to resume from. Inspect the set-aside steps, or rerun to start from step 0.")
        return None

    def _step_dirs(self) -> list[int]:
        """Every directory named by a step number, newest first (Orbax's list, plus step directories it
        does not count, such as ones without a commit marker)."""
        on_disk = {int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()} \
            if self.directory.exists() else set()
        return sorted(on_disk | set(self.manager.all_steps()), reverse=True)

    def _incomplete(self, step: int, with_data: bool) -> str | None:
        d = self.directory / str(step)
        for need in (COMMIT_MARKER, "_CHECKPOINT_METADATA", "state/_METADATA") + (("data",) if with_data else ()):
            if not (d / need).exists():
                return f"is incomplete: {need} is missing"
        return None

    def _check_compatible(self, step: int, abstract_state) -> None:
        """Raises `CheckpointError` if the step's saved state has another structure or other shapes than
        `abstract_state` (a different run's checkpoint). Unreadable metadata is left to the restore, whose
        failure marks the step as damaged."""
        try:
            saved = _saved_leaves(self.manager.item_metadata(step)["state"].tree)
        except Exception:  # noqa: BLE001 - damaged metadata: the restore attempt decides
            return
        want = _abstract_leaves(abstract_state)
        if [s for _, s in saved] == [s for _, s in want]:
            return
        diffs = [f"{w[0]}: checkpoint {s[1]} vs this run {w[1]}" for s, w in zip(saved, want) if s[1] != w[1]]
        detail = "; ".join(diffs[:4]) if diffs else (
            f"the checkpoint holds {len(saved)} arrays, this run's state {len(want)} (first names: "
            f"{[n for n, _ in saved[:3]]} vs {[n for n, _ in want[:3]]})")
        raise CheckpointError(self._other_run(step, detail))

    def _other_run(self, step: int, detail: str) -> str:
        return (f"{self.directory / str(step)} was written by a different run: {detail}. Did the model, optimizer "
                f"or task config change? Use a new workdir, or restore the config that wrote it (its config.json). "
                f"Nothing in the workdir was changed.")

    def set_aside(self, step: int, reason: str) -> str:
        """Moves step `step` out of the checkpoint directory (see the module docstring), saying why."""
        return self._set_aside(step, reason)

    def _set_aside(self, step: int, reason: str) -> str:
        src = self.directory / str(step)
        if jax.process_index() == 0:
            dest_root = self.directory.parent / (self.directory.name + SET_ASIDE)
            dest_root.mkdir(parents=True, exist_ok=True)
            dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            n = 1
            while dest.exists():
                dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{n}"
                n += 1
            src.rename(dest)
            (dest / "REASON.txt").write_text(f"checkpoint step {step} {reason}\n")
            log.warning("checkpoint step %d in %s %s; set aside to %s (nothing deleted)", step, self.directory,
                        reason, dest)
            print(f"warning: checkpoint step {step} {reason}; set aside to {dest} (nothing deleted)", flush=True)
        _barrier(f"set_aside_{step}")
        self.manager.reload()
        return str(step)

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a background save failed
            raise self._save_failed(e, None) from e
        self._in_flight = None

    def close(self):
        """Waits for the last save and closes. After a failed save, whose error is already on its way up,
        later failures of the same kind are only logged."""
        if self._failed:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                log.info("closing the checkpoint manager after a failed save: %s", e)
            return
        self.wait()
        self.manager.close()


def _maybe_fail_for_test(directory) -> None:
    """The fault tests' full disk: `CRATE_JAX_TEST_DISK_FULL_AT_STEP=s` fails step `s`'s save."""
    at = os.environ.get("CRATE_JAX_TEST_DISK_FULL_AT_STEP")
    if at and epath.Path(directory).parent.name.split(".")[0] == at:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _agree(ok: bool) -> bool:
    """True iff `ok` on every process (a step is used only if all of them could read it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)

