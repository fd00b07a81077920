"""The engine's Task protocol, proved from outside the engine: a toy task defined only in this file (a
linear regression head on random features, with a fixed non-parameter variable and an EMA copy of
the parameters as a task extra) is registered, trained, checkpointed, killed, resumed and evaluated
through `crate_jax.train` on 8 simulated devices. No engine file knows about it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from ml_collections import ConfigDict

from crate_jax.checkpoint.training import TrainCheckpointer
from crate_jax.models import layers as L
from crate_jax.errors import ConfigError
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train import registry
from crate_jax.train.evaluation import eval_batch_size, every_of
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.metrics import read_metrics
from crate_jax.train.setup import Setup
from crate_jax.train.task import DataIterator, Evaluator, Task, TaskBase

FEATURES, OUTPUTS, MOMENTUM = 64, 8, 0.75


def teacher_targets(x):
    w = np.random.default_rng(123).standard_normal((FEATURES, OUTPUTS)).astype(np.float32) / math.sqrt(FEATURES)
    return np.tanh(x) @ w


class Offset(nnx.Variable):
    """A fixed, non-trained variable (a 'buffer'): the engine must shard and checkpoint it too."""


class Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.offset = Offset(jnp.full((FEATURES,), 0.25, jnp.float32), logical_axes=("embed",))
        self.head = L.Dense((FEATURES,), (OUTPUTS,), in_axes=("embed",), out_axes=("classes",), use_bias=True,
                            dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs, kernel_init=L.normal(0.02))

    def __call__(self, x):
        return self.head(jnp.tanh(x) - self.offset[...] + 0.25)


class ToyData:
    """Deterministic random features, one stream per process, resumable from a counter. `crash_at`
    makes `next` raise before that batch (a crash in the middle of a run)."""

    def __init__(self, batch_size, process_index, seed, crash_at=None):
        self.b, self.p, self.seed, self.i, self.crash_at = batch_size, process_index, seed, 0, crash_at

    def __next__(self):
        if self.crash_at is not None and self.i == self.crash_at:
            raise RuntimeError(f"simulated crash before batch {self.i}")
        x = np.random.default_rng([self.seed, self.i, self.p]).standard_normal((self.b, FEATURES)).astype(np.float32)
        self.i += 1
        return {"x": x, "y": teacher_targets(x).astype(np.float32)}

    def get_state(self):
        return {"next": self.i}

    def set_state(self, state):
        self.i = int(state["next"])

    def stats(self):
        return {"batches": self.i}

    def close(self):
        pass


class ToyTask(TaskBase):
    def __init__(self, config):
        super().__init__(config)
        self.model_cfg = None  # never exported; the toy only exercises the engine

    def build_model(self, seed):
        return Regressor(nnx.Rngs(params=jax.random.key(seed)))

    def batch_spec(self):
        return {"x": jax.ShapeDtypeStruct((FEATURES,), jnp.float32), "y": jax.ShapeDtypeStruct((OUTPUTS,), jnp.float32)}

    def loss(self, model, batch, rng, extras):
        err = model(batch["x"]) - batch["y"]
        return jnp.mean(err ** 2), {"train/abs_err": jnp.mean(jnp.abs(err))}, None

    def flops_per_example(self):
        return 6.0 * FEATURES * OUTPUTS

    def train_iterator(self, *, batch_size, process_index, process_count):
        return ToyData(batch_size, process_index, self.config.seed, self.config.get("crash_at", None))

    def init_extras(self, params):
        return {"teacher": params}

    def extras_axes(self, param_axes):
        return {"teacher": param_axes}

    def update_extras(self, extras, params, step, aux):
        return {"teacher": jax.tree.map(lambda t, p: MOMENTUM * t + (1 - MOMENTUM) * p, extras["teacher"], params)}


class ToyEvaluator:
    """Held-out MSE of the student and of the EMA teacher."""

    def __init__(self, name, spec, task, mesh):
        self.name, self.every = name, every_of(task.config, spec, f"config.evals.{name}")
        self.batch = eval_batch_size(task.config, spec, mesh, f"config.evals.{name}")

    def run(self, state):
        x = np.random.default_rng(999).standard_normal((self.batch, FEATURES)).astype(np.float32)
        y = teacher_targets(x)
        mse = lambda m: float(jnp.mean((m(jnp.asarray(x)) - y) ** 2))
        return {"mse": mse(state.model()), "teacher_mse": mse(state.model(params=state.extras["teacher"]))}


def toy_config(**kw):
    c = ConfigDict(dict(task="toy_ema", seed=7, batch_size=32, total_steps=6, mesh=dict(data=2, fsdp=2, tensor=2),
                        microbatches=1, log_every=1, checkpoint_every=1, keep_checkpoints=10, async_checkpoints=False,
                        eval_every=3, eval_batch_size=64, crash_at=None, init=dict(checkpoint=None),
                        optim=dict(name="adamw", lr=0.05, warmup_steps=0, schedule="constant", b1=0.9, b2=0.99,
                                   wd=0.0, clip=0.0),
                        evals=dict(heldout=dict(type="toy_mse"))))
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(autouse=True)
def registered():
    registry.register_task("toy_ema", ToyTask)
    registry.register_evaluator("toy_mse", ToyEvaluator)
    yield
    registry.TASKS.pop("toy_ema", None)
    registry.EVALUATORS.pop("toy_mse", None)


def restore(cfg, wd, step=None):
    """(step, state, data state) of the newest checkpoint, or the state of checkpoint `step`."""
    setup = Setup(cfg, make_mesh(cfg.mesh))
    ck = TrainCheckpointer(wd / "checkpoints", async_save=False)
    try:
        if step is None:
            return ck.restore(setup.abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state))
        return ck.manager.restore(step, args=args)["state"]
    finally:
        ck.close()


def test_the_toy_implements_the_protocols():
    cfg = toy_config()
    task = ToyTask(cfg)
    assert isinstance(task, Task)
    assert isinstance(ToyData(2, 0, 0), DataIterator)
    assert isinstance(ToyEvaluator("h", ConfigDict({"type": "toy_mse"}), task, make_mesh(cfg.mesh)), Evaluator)


def test_toy_task_trains_checkpoints_resumes_and_evaluates_on_8_devices(tmp_path):
    cfg = toy_config()
    mesh = make_mesh(cfg.mesh)
    setup = Setup(cfg, mesh)
    # every part of the state is sharded by the logical rules: params, the buffer, the EMA extra
    assert tuple(setup.state_sh["params"]["head"]["kernel"].spec) == ("fsdp", "tensor")
    assert tuple(setup.state_sh["buffers"]["offset"].spec) == ("fsdp",)
    assert tuple(setup.state_sh["extras"]["teacher"]["head"]["kernel"].spec) == ("fsdp", "tensor")
    p0 = jax.tree.map(np.asarray, setup.fresh_state()["params"])

    ref = train_and_evaluate(cfg, tmp_path / "ref")  # uninterrupted
    params = {0: p0}
    for s in range(1, 7):
        params[s] = jax.tree.map(np.asarray, restore(cfg, tmp_path / "ref", s)["params"])
    ema = p0
    for s in range(1, 7):
        ema = jax.tree.map(lambda t, p: MOMENTUM * t + (1 - MOMENTUM) * p, ema, params[s])

    wd = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash before batch 4"):
        train_and_evaluate(toy_config(crash_at=4), wd)  # dies after step 4's checkpoint was written
    out = train_and_evaluate(cfg, wd)  # the same command resumes
    step, state, data = restore(cfg, wd)
    assert step == 6 and data == {"next": 6}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7),
                 state["params"], params[6])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7),
                 state["extras"]["teacher"], ema)
    np.testing.assert_array_equal(np.asarray(state["buffers"]["offset"]), 0.25)
    # the evaluator ran (every 3 steps and at the end) on the student and on the EMA teacher
    assert out["eval/heldout/mse"] == pytest.approx(ref["eval/heldout/mse"], rel=1e-5)
    assert out["eval/heldout/teacher_mse"] == pytest.approx(ref["eval/heldout/teacher_mse"], rel=1e-5)
    assert out["eval/heldout/teacher_mse"] != out["eval/heldout/mse"]
    first = [r for r in read_metrics(wd / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]  # each step once, re-run steps not repeated
    assert first[-1]["train/loss"] < first[0]["train/loss"]


def test_unknown_task_and_evaluator_names_fail_at_start_up_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"config.task: unknown name 'nope'.*'classification', 'clip'"):
        Setup(toy_config(task="nope"), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    with pytest.raises(ConfigError, match=r"config.evals.heldout.type: unknown name 'mse'.*'classification'"):
        Setup(toy_config(evals=dict(heldout=dict(type="mse"))), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    # a config may also name the class directly
    assert registry.task_class("test_task_protocol:ToyTask") is ToyTask
