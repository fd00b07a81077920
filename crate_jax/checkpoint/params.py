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

from crate_jax.checkpoint.bundle import MODEL_JSON, PARAMS_DIR
from crate_jax.checkpoint.training import as_path, committed_steps

log = logging.getLogger(__name__)


class ParamsError(ValueError):
    """A path that holds no readable parameters; the message names it and what was expected."""


def checkpoint_dir(path) -> Path:
    """The `checkpoints/` directory of a workdir (or `path` itself when it is one)."""
    path = as_path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def read_params(path: str | Path, step: int | None = None, *, subtree: str = "params") -> dict:
    """Parameters (nested dict of numpy arrays) from a bundle directory, a training workdir (its newest
    committed step, or `step`), or a workdir's `checkpoints/<step>` directory. `subtree` picks another
    part of a training state (e.g. `'extras'`, whose `teacher` holds an EMA teacher's parameters)."""
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


def _restore(target: Path, key: str | None, shown: Path) -> dict:
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(target)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds; all mean "unreadable"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ParamsError(f"{shown}: the checkpoint cannot be read ({type(e).__name__}: {first}); it is damaged or "
                          f"incomplete") from e
    if key is not None:
        if not isinstance(tree, dict) or key not in tree:
            raise ParamsError(f"{shown}: the training state has no {key!r} (it holds {sorted(tree)})")
        tree = tree[key]
    return jax.tree.map(np.asarray, tree)
