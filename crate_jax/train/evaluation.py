"""Evaluators: built from `config.evals`, run on the train state on their schedule.

`config.evals` is a list of named evaluators (a ConfigDict keeps them in order), big_vision style:

    config.evals.val = dict(type="classification", every=1000)        # top-1 / top-5 / loss
    config.evals.imagenet = dict(type="zeroshot", source="tfds", ...)  # CLIP zero-shot
    config.evals.heldout = dict(type="retrieval", shards=...)

`type` picks the class (`crate_jax.train.registry.EVALUATORS`, or a "module:Class" path); `every`
defaults to `config.eval_every` (0: only at the end) and `batch_size` to `config.eval_batch_size`
(default the train batch). Every other key belongs to the evaluator. A class is built as
`cls(name, spec, task, mesh)` during `Setup`, so its config errors are start-up errors; `run(state)`
returns `{metric: float}`, logged as `eval/<name>/<metric>`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from crate_jax.errors import ConfigError
from crate_jax.parallel import sharding as sh
from crate_jax.parallel.mesh import data_parallel_size
from crate_jax.train import registry


@dataclasses.dataclass
class EvalState:
    """What an evaluator sees: the step, the train state's parts, the mesh and the graph to rebuild the
    network. `model()` is the trained network; `model(params=extras['teacher'])` an EMA teacher."""

    step: int
    params: Any
    buffers: Any
    extras: Any
    graphdef: Any
    mesh: Mesh

    def model(self, params=None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.buffers or {})

    @classmethod
    def of(cls, step: int, state: dict, graphdef, mesh: Mesh) -> "EvalState":
        from crate_jax.train.state import state_parts
        params, buffers, extras = state_parts(state)
        return cls(step=int(step), params=params, buffers=buffers, extras=extras, graphdef=graphdef, mesh=mesh)


def jit_on_model(graphdef, fn):
    """`jax.jit` of `fn(model, *args)` as a function of `(params, buffers, *args)`: one compile serves
    every evaluation (new parameters, same shapes)."""
    return jax.jit(lambda params, buffers, *args: fn(nnx.merge(graphdef, params, buffers or {}), *args))


def summed_over(fn, state, batches, mesh: Mesh) -> dict:
    """The per-batch sums `fn(params, buffers, global batch)` (a jitted `jit_on_model`) added up over `batches`
    (per-process numpy batches), on the host; None when there is no batch."""
    total = None
    for batch in batches:
        s = fn(state.params, state.buffers, sh.global_batch(batch, mesh))
        total = s if total is None else jax.tree.map(jax.numpy.add, total, s)
    return None if total is None else jax.device_get(total)


def eval_batch_size(config: ConfigDict, spec: ConfigDict, mesh: Mesh, key: str) -> int:
    """The global eval batch of one evaluator, checked against the data axes and the process count."""
    b = spec.get("batch_size") or config.get("eval_batch_size") or config.batch_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError(f"{key}.batch_size (or config.eval_batch_size): expected a positive integer, got {b!r}")
    dp, n_proc = data_parallel_size(mesh), jax.process_count()
    if b % dp or b % n_proc:
        lcm = int(np.lcm(dp, n_proc))
        raise ConfigError(f"{key}: eval batch size {b} (config.eval_batch_size or {key}.batch_size) is not "
                          f"divisible by the data-parallel axes data×fsdp = {dp} (mesh {dict(mesh.shape)}) and the "
                          f"{n_proc} processes; use a multiple of {lcm}, e.g. {lcm * max(1, round(b / lcm))}")
    return int(b)


def schedule_of(name: str, spec: ConfigDict, task, mesh) -> tuple[int, int]:
    """`(every, batch_size)` of evaluator `name` (`config.evals.NAME`): how often it runs and its checked
    global batch, which every evaluator's constructor sets."""
    key = f"config.evals.{name}"
    return every_of(task.config, spec, key), eval_batch_size(task.config, spec, mesh, key)


def every_of(config: ConfigDict, spec: ConfigDict, key: str) -> int:
    every = spec.get("every", None)
    every = config.get("eval_every", 0) if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"{key}.every (or config.eval_every): expected an integer >= 0 (0: only at the end), "
                          f"got {every!r}")
    return int(every)


def from_config(task, mesh: Mesh) -> list:
    """The evaluators `task.config.evals` describes, in order."""
    evals = task.config.get("evals", None)
    if evals is None:
        return []
    if not isinstance(evals, (dict, ConfigDict)):
        raise ConfigError(f"config.evals: expected named evaluators (config.evals.NAME = dict(type=...)), got "
                          f"{type(evals).__name__}")
    out = []
    for name, spec in evals.items():
        key = f"config.evals.{name}"
        if not isinstance(spec, (dict, ConfigDict)) or not spec.get("type"):
            raise ConfigError(f"{key}: expected a dict with a 'type' (one of {sorted(registry.EVALUATORS)}), "
                              f"got {spec!r}")
        spec = spec if isinstance(spec, ConfigDict) else ConfigDict(spec)
        cls = registry.evaluator_class(spec.type, f"{key}.type")
        out.append(cls(name, spec, task, mesh))
    return out


def due(evaluator, step: int, total_steps: int) -> bool:
    """Run at every `every`-th step, and always at the end."""
    return step == total_steps or bool(evaluator.every and step % evaluator.every == 0)
