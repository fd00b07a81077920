"""What the engine asks of a training task, and of an evaluator, written down as Protocols.

A *task* is one task family: supervised classification, CLIPA image-text, a language model, masked
autoencoding, self-distillation. It knows its model, its loss, its data and its FLOPs; the engine
(`crate_jax.train.setup.Setup` + `crate_jax.train.loop`) owns everything generic: the mesh and
shardings, the fresh initialisation straight into them, the per-process batch, the step count, the
optimizer, the compiled step, checkpoints, metrics and the evaluation schedule. Tasks are selected
by `config.task` through `crate_jax.train.registry` (`name -> "module:Class"`), so a new family is a
new module plus one table entry, or `register_task(...)` from user code: no engine file changes.

`TaskBase` gives every optional member a default, so a small task writes only `build_model`,
`batch_spec`, `loss`, `flops_per_example` and `train_iterator`.

The train state the engine keeps is a plain dict of arrays (what Orbax checkpoints):

    {'step': int32 [], 'params': ..., 'opt_state': ...,
     'buffers': ...,   # every non-Param variable of the model (fixed tables, statistics), if any
     'extras': ...}    # the task's own state (an EMA teacher, running buffers), if any

Every part is sharded by the same logical-axis rules (`crate_jax.parallel.sharding`). `train_state`
(`crate_jax/train/state.py`) is the one place that layout is written: the fresh state, its shardings and the step's output all go
through it, and `state_parts` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from crate_jax.parallel.sharding import Axes


@runtime_checkable
class DataIterator(Protocol):
    """This process's endless stream of per-process batches (`dict[str, np.ndarray]`, leading axis the
    per-process batch), resumable exactly from `get_state()` (JSON-serialisable; saved in every
    checkpoint, one file per process)."""

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: Mapping[str, Any]) -> None: ...

    def stats(self) -> dict[str, float]:
        """Cumulative counters shown as `data/<key>` in the metrics (e.g. skipped bad images)."""

    def close(self) -> None: ...


@runtime_checkable
class Task(Protocol):
    """One task family. Members, in the order the engine uses them:

    config: the run's ConfigDict.
    model_cfg: the model's config; its class declares the bundle kind (`crate_jax.models.registry`),
        which the engine writes to `model.json` so that `export` / `predict` rebuild the model
        (None: a model that is never exported).
    describe(): one line for the start-up message.
    validate(mesh): task-specific checks against the mesh, raising `ConfigError` before anything
        compiles (the engine has already checked batch vs data axes, microbatches, the mesh).
    num_train_examples(): the train split's size when `config.num_epochs` sets the run length, else
        may return None.
    build_model(seed): a fresh `nnx.Module`. The engine traces it abstractly for shapes and
        shardings, then runs it under `jax.jit` straight into the shardings.
    init_params(fresh): with `config.init.checkpoint` set, the parameters to start from (host numpy
        nested dict, the structure of `fresh`): pretrained values merged into the fresh ones.
    batch_spec(): per-example `jax.ShapeDtypeStruct` of every batch key (no batch axis).
    loss(model, batch, rng, extras): `(loss, metrics, aux)` inside the jitted step. `batch` is the
        global batch (sharded over data × fsdp); `metrics` is a dict of scalars (logged as given);
        `aux` is any pytree handed to `update_extras` (averaged over microbatches), or None.
    init_extras(params): the task's own state (dict of arrays, `{}` if none), built from the
        initial parameters inside jit.
    extras_axes(param_axes): logical `Axes` for every leaf of `init_extras`' result; `param_axes` is
        the parameters' tree of `Axes` (an EMA copy of the params returns it as is).
    update_extras(extras, params, step, aux): the extras after the optimizer update of `step`
        (0-based), from the updated `params`. Pure; runs inside the jitted step.
    flops_per_example(): model FLOPs of one training example (forward + backward), for MFU.
    tokens_per_example(): tokens in one example (a language model's sequence length), or None; when
        set, the progress line and metrics show `perf/tokens_per_s`.
    total_steps: set by the engine (`Setup`) before the step is built, for schedules inside the task
        (an EMA momentum schedule, say).
    train_iterator(batch_size, process_index, process_count): this process's `DataIterator`.
    evaluators(mesh): the `Evaluator`s to run (usually built from `config.evals` by
        `crate_jax.train.evaluation.from_config`).
    """

    config: ConfigDict
    model_cfg: Any

    def describe(self) -> str: ...

    def validate(self, mesh: Mesh) -> None: ...

    def num_train_examples(self) -> int | None: ...

    def build_model(self, seed: int) -> nnx.Module: ...

    def init_params(self, fresh: dict) -> dict: ...

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]: ...

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array, extras: dict) -> tuple[jax.Array, dict, Any]: ...

    def init_extras(self, params: dict) -> dict: ...

    def extras_axes(self, param_axes: dict) -> dict: ...

    def update_extras(self, extras: dict, params: dict, step: jax.Array, aux: Any) -> dict: ...

    def flops_per_example(self) -> float: ...

    def tokens_per_example(self) -> int | None: ...

    def train_iterator(self, *, batch_size: int, process_index: int, process_count: int) -> DataIterator: ...

    def evaluators(self, mesh: Mesh) -> list["Evaluator"]: ...


@runtime_checkable
class Evaluator(Protocol):
    """One evaluation: `name` (its metrics are logged as `eval/<name>/<metric>`), `every` (run every that
    many steps; 0: only at the end; always at the end of training) and `run(state) -> metrics`.

    Evaluators are configured as named entries of `config.evals` (`type` picks the class through
    `crate_jax.train.registry`) and built before anything compiles, so their config errors surface
    at start-up. `run` gets an `EvalState` (`crate_jax.train.evaluation`): the step, the train state's
    parameters, buffers and extras, the mesh, and `model(...)` to rebuild the network from them.
    """

    name: str
    every: int

    def run(self, state) -> dict[str, float]: ...


class TaskBase:
    """Defaults for a task's optional members (see `Task`)."""

    config: ConfigDict
    model_cfg: Any

    def __init__(self, config: ConfigDict):
        self.config = config

    def describe(self) -> str:
        return type(self).__name__

    def validate(self, mesh: Mesh) -> None:
        pass

    def num_train_examples(self) -> int | None:
        return None

    def tokens_per_example(self) -> int | None:
        return None

    def init_params(self, fresh: dict) -> dict:
        from crate_jax.train.pretrained import load_pretrained
        return load_pretrained(self.config.init, fresh)

    def init_extras(self, params: dict) -> dict:
        return {}

    def extras_axes(self, param_axes: dict) -> dict:
        return {}

    def update_extras(self, extras: dict, params: dict, step: jax.Array, aux: Any) -> dict:
        return extras

    def evaluators(self, mesh: Mesh) -> list[Evaluator]:
        from crate_jax.train.evaluation import from_config
        return from_config(self, mesh)


__all__ = ["Axes", "DataIterator", "Evaluator", "Task", "TaskBase"]
