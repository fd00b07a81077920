"""`train_and_evaluate(config, workdir)`: config → task → sharded state → data → compiled step →
checkpoints, metrics, evaluators.

Every task family runs through this loop: `crate_jax.train.setup.Setup` builds everything that
follows from the config (the task comes from `config.task`), the loop only drives it. A run resumes
from the newest restorable checkpoint in `workdir`; the workdir's `config.json` / `model.json` are
written only once the run is known to fit the workdir (a fresh start, or a successful restore).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from crate_jax.checkpoint.training import TrainCheckpointer, as_path
from crate_jax.models import registry as model_registry
from crate_jax.models.config import ConfigError
from crate_jax.parallel import mesh as mesh_lib
from crate_jax.train import metrics as M
from crate_jax.train.evaluation import EvalState, due, global_batch
from crate_jax.train.setup import Setup, memory_report


class NonFiniteLoss(RuntimeError):
    pass


class DataError(RuntimeError):
    """The training data cannot be opened (missing files, an unprepared dataset); the message says which."""


class _Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        M.console(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def write_run_metadata(workdir, config: ConfigDict, model_cfg) -> None:
    """`config.json` (the run's config) and `model.json` (the model, for `export` / `predict`; only for a
    model config of a registered kind)."""
    if jax.process_index() != 0:
        return
    from crate_jax.checkpoint.bundle import MODEL_JSON
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if model_cfg is None:
        return
    meta = {"kind": model_registry.kind_of(model_cfg), "config": model_cfg.to_dict(), "source": "training"}
    (workdir / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))


def config_changes(workdir, config: ConfigDict) -> list[str]:
    """`'optim.lr: 0.001 -> 0.0005'` for every leaf that differs from the workdir's `config.json`."""
    path = workdir / "config.json"
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return ["(the stored config.json is not JSON)"]
    new = json.loads(config.to_json_best_effort())

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else []):
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def train_and_evaluate(config: ConfigDict, workdir: str | Path) -> dict:
    """Trains to the task's total steps, resuming from `workdir` if it holds checkpoints. Returns the last
    train/eval metrics."""
    workdir = as_path(workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    setup = Setup(config, mesh)  # every config error is raised here, before the workdir is touched
    try:  # open the data before touching the workdir: a missing dataset changes nothing
        train_it = setup.task.train_iterator(batch_size=setup.per_process_batch, process_index=jax.process_index(),
                                             process_count=jax.process_count())
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(f"the training data cannot be opened: {e}") from e
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = TrainCheckpointer(workdir / "checkpoints", keep=config.get("keep_checkpoints", 3),
                                 keep_period=config.get("keep_period", None),
                                 async_save=config.get("async_checkpoints", True))
        try:
            return _train(setup, workdir, ckpt, train_it)
        finally:
            ckpt.close()
    finally:
        train_it.close()


def _train(setup: Setup, workdir, ckpt: TrainCheckpointer, train_it) -> dict:
    config, mesh, task, total_steps = setup.config, setup.mesh, setup.task, setup.total_steps
    restored = ckpt.restore(setup.abstract_state)  # a workdir of another run raises, untouched
    data_state = None
    if restored is not None:
        start, state, data_state = restored
        M.console(f"resumed from {workdir / 'checkpoints'} at step {start}")
        changed = config_changes(workdir, config)
        if changed:
            M.console(f"note: the config differs from the one that wrote this workdir ({len(changed)} keys): "
                      + "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else ""))
    else:
        state, start = setup.fresh_state(), 0
    write_run_metadata(workdir, config, task.model_cfg)  # the run fits the workdir: now it may change
    if data_state is not None:
        train_it.set_state(data_state)

    t0 = time.perf_counter()
    compiled = setup.compile()
    M.console(f"compiled train step in {time.perf_counter() - t0:.1f}s; {memory_report(compiled)} "
              f"(mesh {dict(mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} processes)")
    writer = M.MetricsWriter(workdir, resume_step=start)
    peak = M.measure_matmul_peak() * jax.device_count()
    flops_per_example = task.flops_per_example()
    tokens_per_example = task.tokens_per_example()
    log_every, ckpt_every = int(config.get("log_every", 50)), int(config.get("checkpoint_every", 1000))
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
                    return dict(last, stopped_at=step)
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
