"""Reading the parameters out of whatever a user points at: a params-only bundle, a training workdir
(its newest committed checkpoint, or a given step), or one `checkpoints/<step>` directory.

Used by fine-tuning (`config.init.checkpoint`), `export` and the demos. Only the `params` subtree of
a training checkpoint is read; the optimizer state and the task's extras stay on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from crate_jax.checkpoint.bundle import MODEL_JSON, PARAMS_DIR, nonfinite_leaves
from crate_jax.checkpoint.training import as_path, committed_steps

log = logging.getLogger(__name__)


class ParamsError(ValueError):
    """A path that holds no readable parameters; the message names it and what was expected."""


def checkpoint_dir(path) -> Path:
    """The `checkpoints/` directory of a workdir (or `path` itself when it is one)."""
    path = as_path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def read_params(path: str | Path, step: int | None = None, *, subtree: str = "params",
                allow_nonfinite: bool = False) -> dict:
    """Parameters (nested dict of numpy arrays) from a bundle directory, a training workdir (its newest
    committed step, or `step`), or a workdir's `checkpoints/<step>` directory. `subtree` picks another
    part of a training state (e.g. `'extras'`, whose `teacher` holds an EMA teacher's parameters).
    Arrays holding NaN or inf are refused (`ParamsError` naming them) unless `allow_nonfinite`."""
    tree = _read(path, step, subtree)
    bad = [] if allow_nonfinite else nonfinite_leaves(tree)
    if bad:
        raise ParamsError(f"{path}: {len(bad)} arrays hold NaN or inf ({', '.join(bad[:5])}"
                          f"{', ...' if len(bad) > 5 else ''}); refusing to use them")
    return tree


def _read(path, step, subtree) -> dict:
    path = as_path(path)
    if (path / PARAMS_DIR).is_dir() and (path / MODEL_JSON).is_file():
        if subtree != "params":
            raise ParamsError(f"{path} is a params-only bundle: it has no {subtree!r}")
        return _restore(path / PARAMS_DIR, None, path)
    if (path / "state").is_dir():  # one step directory
        return _restore(path / "state", subtree, path)
    ckdir = checkpoint_dir(path)
    steps = committed_steps(ckdir) if ckdir.is_dir() else []
    if not steps:
        raise ParamsError(f"{path}: no bundle ({MODEL_JSON} + {PARAMS_DIR}/) and no committed checkpoint steps "
                          f"found; expected a directory written by crate_jax.convert / export or by crate_jax.train")
    if step is not None and step not in steps:
        raise ParamsError(f"{ckdir}: no committed checkpoint at step {step}; committed steps: {steps}")
    errors = []
    for s in ([step] if step is not None else sorted(steps, reverse=True)):
        try:
            return _restore(ckdir / str(s) / "state", subtree, ckdir / str(s))
        except ParamsError as e:  # a damaged newest step: say so, use the one before
            errors.append(str(e))
            if step is None:
                log.warning("%s; trying an older step", e)
    raise ParamsError("no readable checkpoint step:\n  " + "\n  ".join(errors))


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns that an item directory (`<step>/state`) has no `_CHECKPOINT_METADATA`: that file lives one
    level up, in the step directory, which the training restore checks; reading the item alone is normal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in str(record.msg)


def _restore(target: Path, key: str | None, shown: Path) -> dict:
    """Reads `target` (an Orbax PyTree directory), only its `key` subtree when given, onto this process's
    first device: a checkpoint written on another number of devices or hosts reads back the same."""
    quiet = _NoItemMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_item(target, key, shown)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_item(target: Path, key: str | None, shown: Path) -> dict:
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(target)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds; all mean "unreadable"
        raise ParamsError(f"{shown}: the checkpoint cannot be read ({_first(e)}); it is damaged or incomplete") from e
    if not isinstance(tree, dict):
        raise ParamsError(f"{shown}: the checkpoint cannot be read (its array metadata is unreadable); it is damaged "
                          f"or incomplete")
    if key is not None:
        if key not in tree:
            raise ParamsError(f"{shown}: the training state has no {key!r} (it holds {sorted(tree)})")
        tree = {key: tree[key]}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
                            is_leaf=is_array)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(target, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=key is not None))
    except Exception as e:  # noqa: BLE001
        raise ParamsError(f"{shown}: the checkpoint cannot be read ({_first(e)}); it is damaged or incomplete") from e
    if key is not None:
        out = out[key]
    return jax.tree.map(np.asarray, out)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
