"""The sharded engine: sharded == unsharded, gradient accumulation, resume, different mesh, SIGTERM,
non-finite loss, config validation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from crate_jax.checkpoint.training import CheckpointError, TrainCheckpointer
from crate_jax.models import ConfigError
from crate_jax.parallel.mesh import MeshError, make_mesh
from crate_jax.train.loop import NonFiniteLoss, train_and_evaluate
from crate_jax.train.setup import Setup
from train_helpers import losses, tiny_config

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path, name, **kw):
    wd = tmp_path / name
    train_and_evaluate(tiny_config(**kw), wd)
    return wd


def assert_losses_close(a, b, rtol=1e-5):
    assert sorted(a) == sorted(b) and a, (a, b)
    for s in a:
        assert abs(a[s] - b[s]) <= rtol * abs(b[s]), (s, a[s], b[s])


def test_sharded_equals_unsharded(tmp_path):
    single = losses(run(tmp_path, "one", **{"mesh.num_devices": 1, "total_steps": 5}))
    sharded_wd = run(tmp_path, "eight", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "total_steps": 5})
    assert_losses_close(losses(sharded_wd), single)
    # the parameters really were sharded over fsdp and tensor
    setup = Setup(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
                  make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    D = setup.param_sh["encoder"]["blocks"]["odl"]["D"]
    assert tuple(D.spec) == (None, "fsdp", "tensor")


def test_gradient_accumulation_equals_full_batch(tmp_path):
    full = losses(run(tmp_path, "full", **{"mesh.num_devices": 2, "total_steps": 4}))
    accum = losses(run(tmp_path, "accum", **{"mesh.num_devices": 2, "total_steps": 4, "microbatches": 4}))
    assert_losses_close(accum, full)


def test_restore_onto_a_different_mesh_gives_identical_parameters(tmp_path):
    wd = run(tmp_path, "a", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "total_steps": 2})
    cfg = tiny_config()
    got = {}
    for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2},
                  {"data": 8, "fsdp": 1, "tensor": 1}):
        setup = Setup(cfg, make_mesh(shape))
        ck = TrainCheckpointer(wd / "checkpoints", async_save=False)
        step, state, data = ck.restore(setup.abstract_state)
        ck.close()
        assert step == 2 and data is not None
        leaf = state["params"]["encoder"]["blocks"]["odl"]["D"]
        assert leaf.sharding.mesh.shape == make_mesh(shape).shape
        got[tuple(shape.values())] = jax.tree.map(np.asarray, state["params"])
    ref = next(iter(got.values()))
    for other in got.values():
        jax.tree.map(np.testing.assert_array_equal, ref, other)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    wd = tmp_path / "nan"
    train_and_evaluate(tiny_config(total_steps=4, checkpoint_every=2), wd)  # a good run up to step 4
    cfg = tiny_config(total_steps=8, checkpoint_every=1)
    cfg.optim.update(lr=1e30, warmup_steps=0, schedule="constant")  # then it diverges
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at step (5|6|7|8)"):
        train_and_evaluate(cfg, wd)
    ck = TrainCheckpointer(wd / "checkpoints", async_save=False)
    setup = Setup(cfg, make_mesh(cfg.mesh))
    step, state, _ = ck.restore(setup.abstract_state)
    ck.close()
    assert step >= 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def _train_cmd(wd, extra=()):
    return [sys.executable, "-m", "crate_jax.train", "--config", "tests/tiny_digits.py", "--workdir", str(wd),
            *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + str(REPO / "tests")
    return env


def _wait_for_step(wd, step, proc, timeout=180):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}\n{proc.stdout.read()}")
        if (wd / "metrics.jsonl").exists() and any(s >= step for s in losses(wd)):
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for training progress")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["--config.total_steps=12", "--config.checkpoint_every=3", "--config.async_checkpoints=True"]
    ref = tmp_path / "ref"  # uninterrupted, in this process, on the same 2-device mesh as the subprocesses
    train_and_evaluate(tiny_config(total_steps=12, checkpoint_every=3, **{"mesh.num_devices": 2}), ref)
    wd = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(wd, steps), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(wd, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(wd))
    assert killed_at < 12
    out = subprocess.run(_train_cmd(wd, steps), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout
    a, b = losses(ref), losses(wd)
    assert max(b) == 12
    np.testing.assert_allclose(b[12], a[12], rtol=1e-6)
    for s in range(killed_at + 1, 13):
        np.testing.assert_allclose(b[s], a[s], rtol=1e-6)


def test_sigterm_saves_a_checkpoint_at_the_step_it_stopped(tmp_path):
    wd = tmp_path / "term"
    proc = subprocess.Popen(_train_cmd(wd, ["--config.total_steps=100000", "--config.checkpoint_every=100000"]),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(wd, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stopped], (steps, stopped)


def test_incompatible_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    wd = run(tmp_path, "a", total_steps=2)
    cfg = tiny_config(total_steps=4)
    cfg.optim.clip = 0.0  # a different optimizer chain: the saved opt_state no longer fits
    with pytest.raises(CheckpointError, match="written by a different run.*Nothing in the workdir was changed"):
        train_and_evaluate(cfg, wd)


def test_config_validation_errors(tmp_path):
    with pytest.raises(MeshError, match="product 8"):
        make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match="not divisible by the data-parallel axes"):
        Setup(tiny_config(batch_size=30), make_mesh({"data": 4, "fsdp": 2, "tensor": 1}))
    with pytest.raises(ConfigError, match="not divisible by patch size"):
        Setup(tiny_config(**{"model.patch_size": 5}), make_mesh({"data": -1}))
    with pytest.raises(ConfigError, match="unknown crate_alpha variant"):
        Setup(tiny_config(**{"model.variant": "Q/4"}), make_mesh({"data": -1}))
    with pytest.raises(ConfigError, match="microbatches"):
        Setup(tiny_config(microbatches=3), make_mesh({"data": -1}))


def test_two_processes_match_one_process(tmp_path):
    """2 local processes × 2 CPU devices via jax.distributed on 127.0.0.1 == 1 process with 4 devices."""
    import portpicker
    steps = ["--config.total_steps=4", "--config.checkpoint_every=2"]
    env1 = _env()
    env1["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    one = tmp_path / "one"
    subprocess.run(_train_cmd(one, steps), cwd=REPO, env=env1, check=True, capture_output=True)
    port = portpicker.pick_unused_port()
    env2 = _env()
    env2.pop("XLA_FLAGS")
    two = tmp_path / "two"
    procs = [subprocess.Popen(_train_cmd(two, steps + [f"--coordinator=127.0.0.1:{port}", "--num-processes=2",
                                                       f"--process-id={i}", "--local-devices=2"]),
                              cwd=REPO, env=env2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "4 devices, 2 processes" in outs[0]
    assert_losses_close(losses(two), losses(one))
    # only process 0 writes the logs; both processes' data positions are in the checkpoint
    data_files = sorted(p.name for p in (two / "checkpoints" / "4" / "data").iterdir() if p.suffix == ".json")
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
