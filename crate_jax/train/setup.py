"""`Setup(config, mesh)`: everything about a run that follows from the config and the mesh without
touching data or parameters: the task, the abstract sharded train state, the evaluators and the
sharded train step, ready to compile.

All config errors surface here, before anything compiles (`ConfigError` / `MeshError`): the
generic ones (`crate_jax.train.validate`), the task's (`Task.validate`) and the evaluators'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from crate_jax.models import registry as model_registry
from crate_jax.models.act_sharding import activation_mesh
from crate_jax.errors import ConfigError
from crate_jax.parallel import sharding as sh
from crate_jax.train import registry
from crate_jax.train.defaults import engine_value
from crate_jax.train.optim import build_optimizer
from crate_jax.train.step import make_train_step
from crate_jax.train.state import train_state
from crate_jax.train.validate import check_batch, validate_config


def make_task(config: ConfigDict, mesh: Mesh | None = None):
    """The task `config.task` names (see `crate_jax.train.registry`), built from the config once its engine keys
    are valid (types and ranges; with `mesh`, the batch against it too: a task may open its data to read the
    class count)."""
    validate_config(config)
    if mesh is not None:
        check_batch(config, mesh)
    return registry.task_class(engine_value(config, "task"))(config)


def opt_state_shardings(tx, abstract_params, param_sh, mesh):
    """Shardings for the optimizer state: moments follow their parameter, scalars (step counts) are
    replicated: `tx.init` on sharded parameters would put the scalar step count on device 0 alone."""
    shapes = jax.eval_shape(tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen parameters (optim.freeze) have no moments
    return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, shapes, param_sh,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()),
                                 is_leaf=lambda x: isinstance(x, NamedSharding) or masked(x))


def _copy(tree):
    """Fresh buffers for every leaf: the extras are often built from the parameters themselves (an EMA
    teacher starts as the student), and two state leaves must never share one donated buffer."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Setup:
    """Attributes: `task`, `mesh`, `total_steps`, `global_batch_size`, `per_process_batch`, `graphdef`,
    `param_axes` (tree of `Axes`), `abstract_state` (ShapeDtypeStructs with shardings), `state_sh`,
    `param_sh`, `batch_sh`, `batch_shapes` (global), `tx`, `lr_fn`, `evaluators`, `train_step` (jitted,
    the state donated). `fresh_state()` initialises a state straight into its shardings; `compile()`
    compiles the step ahead of time."""

    def __init__(self, config: ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        self.task = task = make_task(config, mesh)
        if task.model_cfg is not None:  # exportable models declare their bundle kind
            model_registry.kind_of(task.model_cfg)
        task.validate(mesh)
        self.evaluators = task.evaluators(mesh)  # their config errors too, before any data is opened
        self.global_batch_size = int(config.batch_size)
        self.per_process_batch = self.global_batch_size // jax.process_count()
        self.total_steps = task.total_steps = self._total_steps()  # for schedules inside the task

        abstract_model = nnx.eval_shape(lambda: task.build_model(config.seed))
        self.graphdef, params_state, buffers_state = nnx.split(abstract_model, nnx.Param, ...)
        self.param_axes = sh.state_axes(params_state)
        self.param_sh = sh.state_shardings(params_state, mesh)
        self.buffer_sh = sh.state_shardings(buffers_state, mesh)
        abstract_params = nnx.to_pure_dict(params_state)
        self.tx, self.lr_fn = build_optimizer(config.optim, abstract_params, self.total_steps, self.param_axes)

        extras = jax.eval_shape(task.init_extras, abstract_params)
        self.state_sh = state_sh = train_state(
            sh.replicated(mesh), self.param_sh, opt_state_shardings(self.tx, abstract_params, self.param_sh, mesh),
            self.buffer_sh, sh.axes_shardings(task.extras_axes(self.param_axes), extras, mesh) if extras else None)
        shapes = jax.eval_shape(self.init_state, abstract_params, nnx.to_pure_dict(buffers_state))
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           shapes, state_sh)

        spec = task.batch_spec()
        self.batch_sh = {k: sh.batch_sharding(mesh, len(v.shape) + 1) for k, v in spec.items()}
        self.batch_shapes = {k: jax.ShapeDtypeStruct((self.global_batch_size,) + tuple(v.shape), v.dtype,
                                                     sharding=self.batch_sh[k]) for k, v in spec.items()}
        step_fn = make_train_step(self.graphdef, task, self.tx, self.lr_fn, seed=config.seed,
                                  microbatches=engine_value(config, "microbatches"))

        def step_on_mesh(state, batch):  # activations batch-sharded between blocks (models/act_sharding.py)
            with activation_mesh(mesh):
                return step_fn(state, batch)
        self.train_step = jax.jit(step_on_mesh, in_shardings=(self.state_sh, self.batch_sh),
                                  out_shardings=(self.state_sh, sh.replicated(mesh)), donate_argnums=(0,))

    def _total_steps(self) -> int:
        c = self.config
        if c.get("total_steps"):
            return int(c.total_steps)
        n = self.task.num_train_examples()
        if not n:
            raise ConfigError(f"config.num_epochs is set but the {c.get('task', 'classification')} task cannot tell "
                              f"the size of its train split; set config.total_steps instead")
        return max(1, int(c.num_epochs * n // self.global_batch_size))

    def init_state(self, params, buffers):
        extras = self.task.init_extras(params)
        return train_state(jnp.zeros((), jnp.int32), params, self.tx.init(params), buffers,
                           _copy(extras) if extras else None)

    def fresh_state(self, *, load_init: bool = True):
        """A new train state, initialised straight into its shardings (`config.seed`); with
        `config.init.checkpoint` (and `load_init`) the task merges pretrained parameters in
        (`Task.init_params`). Benchmarks pass `load_init=False` to time a recipe without its weights."""
        def init():
            _, p, b = nnx.split(self.task.build_model(self.config.seed), nnx.Param, ...)
            return nnx.to_pure_dict(p), nnx.to_pure_dict(b)
        params, buffers = jax.jit(init, out_shardings=(self.param_sh, self.buffer_sh))()
        init_cfg = self.config.get("init", None)
        if load_init and init_cfg is not None and init_cfg.get("checkpoint"):
            try:
                loaded = self.task.init_params(jax.device_get(params))
            except (ValueError, OSError) as e:  # a missing / damaged / mismatched pretrained checkpoint
                raise ConfigError(f"config.init.checkpoint {init_cfg.checkpoint}: {e}") from e
            params = jax.device_put(loaded, self.param_sh)
        return jax.jit(self.init_state, out_shardings=self.state_sh)(params, buffers)

    def compile(self):
        """AOT-compiles the train step for the abstract state and batch (no data, no parameters needed)."""
        return self.train_step.lower(self.abstract_state, self.batch_shapes).compile()

    def model(self, params, buffers=None) -> nnx.Module:
        """The network holding `params` (and the state's `buffers`)."""
        return nnx.merge(self.graphdef, params, {} if buffers is None else buffers)


def memory_report(compiled) -> str:
    mem = compiled.memory_analysis()
    if mem is None:
        return "per-device memory: not reported by this backend"
    return (f"per-device memory: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs "
            f"{mem.output_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
