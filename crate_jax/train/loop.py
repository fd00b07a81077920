"""`train_and_evaluate(config, workdir)`: config → task → sharded state → data → compiled step →
checkpoints, metrics, evaluators.

Every task family runs through this loop: `crate_jax.train.setup.Setup` builds everything that
follows from the config (the task comes from `config.task`), the loop only drives it. The order is the
contract:

1. the workdir is checked and locked (`crate_jax.train.workdir`): an unusable path or a workdir held by
   another run stops here, before a model is built or data opened;
2. the config is validated and the data opened (config and data errors change nothing);
3. the run is checked against the workdir (`crate_jax.train.resume`): the stored seed, each restored
   step's parameters and data-iterator state. Damaged steps are set aside; another run's workdir is
   refused untouched;
4. only then are `config.json` / `model.json` written and the step compiled and run.

SIGINT (Ctrl-C) during 1-4 stops at once (`KeyboardInterrupt`, exit 130 from the command); during
training it saves a checkpoint at the next step boundary (a second Ctrl-C stops at once). SIGTERM
(preemption) saves at the next step boundary too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from crate_jax import errors
from crate_jax.checkpoint.training import TrainCheckpointer, as_path
from crate_jax.errors import ConfigError
from crate_jax.parallel import mesh as mesh_lib
from crate_jax.parallel.sharding import global_batch
from crate_jax.train import metrics as M
from crate_jax.train.defaults import engine_value
from crate_jax.train.evaluation import EvalState, due
from crate_jax.train.resume import (DataStateCheck, config_changes, refuse_changed_stream,
                                    write_run_metadata)
from crate_jax.train.setup import Setup, memory_report
from crate_jax.train.workdir import WorkdirLock, check_workdir


class NonFiniteLoss(errors.StateError):
    """The run produced a non-finite loss, gradient or parameter (exit 3); the message names the last good step."""


class DataError(errors.UsageError):
    """The training data cannot be opened (missing files, an unprepared dataset); the message says which."""


class _Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly. A second
    SIGINT raises `KeyboardInterrupt` at once."""

    def __init__(self):
        self.requested = False
        self.signal: str | None = None  # the name of the first signal received
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name
        M.console(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary"
                  + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def train_and_evaluate(config: ConfigDict, workdir: str | Path, *, command: str | None = None) -> dict:
    """Trains to the task's total steps, resuming from `workdir` if it holds checkpoints (see the module
    docstring for the order of checks). Returns the last train/eval metrics, plus `stopped_at` and
    `stop_signal` when a signal stopped the run early. `command` is what the workdir lock records."""
    workdir = as_path(workdir)
    check_workdir(workdir)
    with WorkdirLock(workdir, command=command):
        mesh = mesh_lib.make_mesh(config.mesh)
        setup = Setup(config, mesh)  # every config error is raised here, before the workdir changes
        try:  # open the data before touching the workdir: a missing dataset changes nothing
            train_it = setup.task.train_iterator(batch_size=setup.per_process_batch,
                                                 process_index=jax.process_index(), process_count=jax.process_count())
        except ConfigError:
            raise
        except (ValueError, OSError) as e:
            raise DataError(f"the training data cannot be opened: {e}") from e
        try:
            refuse_changed_stream(workdir, config, _holds_steps(workdir / "checkpoints"))
            ckpt = TrainCheckpointer(workdir / "checkpoints", keep=engine_value(config, "keep_checkpoints"),
                                     keep_period=config.get("keep_period", None),
                                     async_save=engine_value(config, "async_checkpoints"))
            try:
                return _train(setup, workdir, ckpt, train_it)
            finally:
                ckpt.close()
        finally:
            train_it.close()


def _holds_steps(directory) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _train(setup: Setup, workdir, ckpt: TrainCheckpointer, train_it) -> dict:
    config, mesh, task, total_steps = setup.config, setup.mesh, setup.task, setup.total_steps
    # Another run's workdir raises, untouched; the restored data-iterator state is applied to train_it.
    restored = ckpt.restore(setup.abstract_state, use_data=DataStateCheck(train_it))
    if restored is not None:
        start, state, _ = restored
        M.console(f"resumed from {workdir / 'checkpoints'} at step {start}")
        changed = config_changes(workdir, config)
        if changed:
            M.console(f"note: the config differs from the one that wrote this workdir ({len(changed)} keys): "
                      + "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else ""))
    else:
        state, start = setup.fresh_state(), 0
    write_run_metadata(workdir, config, task.model_cfg)  # the run fits the workdir: now it may change

    M.console("compiling the train step")
    t0 = time.perf_counter()
    if os.environ.get("CRATE_JAX_TEST_COMPILE_DELAY"):  # the fault tests' slow compile: a Ctrl-C lands in it
        time.sleep(float(os.environ["CRATE_JAX_TEST_COMPILE_DELAY"]))
    compiled = setup.compile()
    M.console(f"compiled train step in {time.perf_counter() - t0:.1f}s; {memory_report(compiled)} "
              f"(mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes)")
    writer = M.MetricsWriter(workdir, resume_step=start, wandb=config.get("wandb", None), run_config=config)
    peak = M.measure_matmul_peak() * jax.device_count()
    flops_per_example = task.flops_per_example()
    tokens_per_example = task.tokens_per_example()
    log_every, ckpt_every = int(engine_value(config, "log_every")), int(engine_value(config, "checkpoint_every"))
    last: dict = {}
    pending = None  # (step, metrics) of the previous step, checked one step late to keep the device busy

    def check(pending) -> dict:
        """The metrics of `pending` as floats; stops the run at a non-finite step. A checkpoint is good only if
        its parameters are finite (checked before it is written) and so are the loss and gradients they give
        (known one step later): when step `s` computes a non-finite loss or gradient, the checkpoint of step
        `s - 1` holds the parameters that produced it, and is set aside."""
        step, m = pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if m.get("train/finite", 1.0) != 1.0 or not math.isfinite(m["train/loss"]):
            ckpt.wait()
            if not (math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])) and \
                    step - 1 in ckpt.all_steps():
                ckpt.set_aside(step - 1, f"holds parameters whose loss / gradient at step {step} is non-finite")
            good = [s for s in ckpt.all_steps() if s < step]
            what = (f"non-finite loss {m['train/loss']}" if not math.isfinite(m["train/loss"]) else
                    f"non-finite gradients or parameters (loss {m['train/loss']:.4g})")
            raise NonFiniteLoss(
                f"{what} at step {step}; stopping. "
                + (f"The last good checkpoint is step {good[-1]} in {workdir / 'checkpoints'} (kept steps {good}); "
                   f"rerunning resumes from it, so lower the learning rate or fix the data first."
                   if good else f"No checkpoint had been written yet ({workdir / 'checkpoints'} is empty)."))
        return m

    def evaluate(step, state, final: bool) -> dict:
        out = {}
        for ev in setup.evaluators:
            if final or due(ev, step, total_steps):
                t = time.perf_counter()
                for k, v in ev.run(EvalState.of(step, state, setup.graphdef, mesh)).items():
                    out[f"eval/{ev.name}/{k}"] = float(v)
                out[f"perf/eval_s/{ev.name}"] = time.perf_counter() - t
        if out:
            writer.write(step, out)
            M.console(f"eval @ {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(out.items())
                                                    if k.startswith("eval/")))
        return out

    M.console(f"training {task.describe()} for {total_steps} steps (global batch {setup.global_batch_size}) "
              f"from step {start}; workdir {workdir}")
    t_last, step_last = time.perf_counter(), start
    step = start
    with _Preemption() as preempt:
        try:
            while step < total_steps:
                batch = global_batch(next(train_it), mesh)
                state, metrics = compiled(state, batch)
                step += 1
                if pending is not None:
                    last_m = check(pending)
                pending = (step, metrics)
                if step % log_every == 0 or step == total_steps:
                    last_m = check(pending)
                    now = time.perf_counter()
                    sps = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    eps = sps * setup.global_batch_size
                    last_m.update({"perf/steps_per_s": sps, "perf/examples_per_s": eps,
                                   "perf/mfu": eps * flops_per_example / peak})
                    if tokens_per_example:
                        last_m["perf/tokens_per_s"] = eps * tokens_per_example
                    last_m.update({f"data/{k}": float(v) for k, v in train_it.stats().items()})
                    writer.write(step, last_m)
                    M.console(M.progress_line(step, total_steps, last_m, (total_steps - step) / max(sps, 1e-9)))
                    last = last_m
                stop = preempt.any_process()
                if step % ckpt_every == 0 or stop or step == total_steps:
                    check(pending)  # only a finite state is ever written
                    ckpt.save(step, state, train_it.get_state(), force=True)
                if stop:
                    ckpt.wait()
                    M.console(f"stopped at step {step} on request; checkpoint saved in {workdir / 'checkpoints'}")
                    return dict(last, stopped_at=step, stop_signal=preempt.signal)
                if step != total_steps:
                    last.update(evaluate(step, state, final=False))
            ckpt.wait()
            last.update(evaluate(step, state, final=True))
        finally:
            writer.close()
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(last, indent=2, sort_keys=True))
    final = max(ckpt.all_steps(), default=None)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(last.items()) if k.startswith("eval/"))
    M.console(f"done: step {step}/{total_steps}; {summary or 'no eval'}; checkpoint: "
              f"{workdir / 'checkpoints' / str(final) if final is not None else 'none'}; metrics: "
              f"{workdir / 'metrics.jsonl'}")
    return last
