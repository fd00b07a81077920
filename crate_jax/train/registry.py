"""The tables that select a task (`config.task`) and an evaluator (`config.evals.<name>.type`).

Each entry maps a name to `"module:Class"`, imported only when chosen, so the engine never imports
the task families and an unknown name fails at start-up with the list of valid ones. User code adds
its own with `register_task` / `register_evaluator` (a class or a "module:Class" string), and a
config may also name a class directly: `config.task = "my_pkg.my_module:MyTask"`.
"""

from __future__ import annotations

import importlib
from typing import Any

from crate_jax.errors import ConfigError

TASKS: dict[str, Any] = {
    "classification": "crate_jax.classify.task:ClassificationTask",
    "clip": "crate_jax.clip.task:ClipTask",
    "lm": "crate_jax.lm.task:LMTask",
    "mlm": "crate_jax.mlm.task:MLMTask",
    "glue": "crate_jax.mlm.glue:GlueTask",
    "mae": "crate_jax.ssl.mae_task:MAETask",
    "simdino": "crate_jax.ssl.simdino_task:SimDINOTask",
}

EVALUATORS: dict[str, Any] = {
    "classification": "crate_jax.classify.evaluators:ClassificationEvaluator",
    "zeroshot": "crate_jax.clip.zeroshot:ZeroShotEvaluator",
    "retrieval": "crate_jax.clip.zeroshot:RetrievalEvaluator",
    "lm_loss": "crate_jax.lm.evaluators:LMLossEvaluator",
    "mlm_loss": "crate_jax.mlm.evaluators:MLMLossEvaluator",
    "glue": "crate_jax.mlm.glue:GlueEvaluator",
    "knn": "crate_jax.probe.knn:KNNEvaluator",
    "linear_probe": "crate_jax.probe.linear_probe:LinearProbeEvaluator",
    "segmentation": "crate_jax.analysis.seg_evaluator:SegmentationEvaluator",
}


def register_task(name: str, target) -> None:
    """Adds (or replaces) task `name`: a class or a `"module:Class"` string."""
    TASKS[name] = target


def register_evaluator(name: str, target) -> None:
    """Adds (or replaces) evaluator type `name`: a class or a `"module:Class"` string."""
    EVALUATORS[name] = target


def _load(target: str, key: str):
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {target!r} ({type(e).__name__}: {e})") from e


def resolve(table: dict[str, Any], name: str, key: str):
    """The class `name` selects in `table` (or `name` itself if it is a `"module:Class"` path)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: expected a name, one of {sorted(table)}, got {name!r}")
    target = table.get(name)
    if target is None:
        if ":" in name:
            return _load(name, key)
        raise ConfigError(f"{key}: unknown name {name!r}; valid names: {sorted(table)} (or 'module:Class')")
    return _load(target, key) if isinstance(target, str) else target


def task_class(name: str):
    return resolve(TASKS, name, "config.task")


def evaluator_class(name: str, key: str):
    return resolve(EVALUATORS, name, key)
