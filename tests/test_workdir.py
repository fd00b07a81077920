"""One run per workdir, nothing in it changes before the run is known to fit it, and every failure ends
with one `error:` line and its exit code (`crate_jax.train.workdir`, `crate_jax.train.resume`,
`crate_jax.errors`), through the public command on the tiny digits config."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crate_jax.errors import StateError
from crate_jax.train.__main__ import main as train_main
from crate_jax.train.metrics import MetricsWriter, read_metrics
from crate_jax.train.workdir import LOCK_NAME, WorkdirLock, check_workdir
from fs_helpers import tree_digest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "tiny_digits.py")


def train(wd, *overrides) -> int:
    return train_main(["--config", TINY, "--workdir", str(wd), *overrides])


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(("error:", "config error:"))]


def one_error(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def losses(wd) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(wd) / "metrics.jsonl") if "train/loss" in r}


def metric_steps(wd) -> list[int]:
    return [json.loads(ln)["step"] for ln in (Path(wd) / "metrics.jsonl").read_text().splitlines()]


def steps_on_disk(wd) -> list[int]:
    return sorted(int(p.name) for p in (Path(wd) / "checkpoints").iterdir() if p.name.isdigit())


def cli_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), **extra)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4, 6."""
    wd = tmp_path_factory.mktemp("ref") / "run"
    assert train(wd) == 0
    assert steps_on_disk(wd) == [2, 4, 6] and not (wd / LOCK_NAME).exists()
    return wd


# ------------------------------------------------------------------------------ the lock
def test_a_held_workdir_is_refused_at_once_and_left_untouched(reference, tmp_path, capsys, monkeypatch):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    with WorkdirLock(wd, command="python -m crate_jax.train --first"):
        before = tree_digest(wd)
        import crate_jax.train.loop as loop
        monkeypatch.setattr(loop, "Setup", lambda *a: pytest.fail("the model was built before the lock was taken"))
        assert train(wd) == 3
        line = one_error(capsys.readouterr().err)
        assert f"pid {os.getpid()}" in line and "in use by another training run" in line and "--first" in line
        assert tree_digest(wd) == before
    assert not (wd / LOCK_NAME).exists()  # released: removed with the lock


def test_a_dead_runs_lock_file_does_not_block(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then", "command": "x"}))
    with WorkdirLock(wd):  # nobody holds the OS lock: taken, whatever the file says
        assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(StateError, match=f"pid {os.getpid()}"):  # a second holder in this very process
            WorkdirLock(wd).__enter__()


def test_an_object_store_workdir_gets_a_lease_that_refuses_a_second_run_and_lapses(tmp_path, capsys):
    from crate_jax.train import workdir as W
    first = W._Lease(tmp_path)
    first.acquire(W.holder_text("first"))
    assert "best-effort lease" in capsys.readouterr().err
    with pytest.raises(StateError, match=f"pid {os.getpid()}.*first"):
        W._Lease(tmp_path).acquire(W.holder_text("second"))
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    lapsed = {"pid": 1, "host": "h", "started": "s", "command": "c", "renewed_at": time.time() - W.LEASE_S - 1}
    (tmp_path / LOCK_NAME).write_text(json.dumps(lapsed))  # a killed run's lease, older than LEASE_S
    second = W._Lease(tmp_path)
    second.acquire(W.holder_text("second"))
    assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "second"
    second.release()


def test_two_runs_started_together_one_trains_the_other_is_refused_at_once(tmp_path):
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "crate_jax.train", "--config", TINY, "--workdir", str(wd)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
             for _ in range(2)]
    ends = {}
    while len(ends) < 2:
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.monotonic()
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], [o[1][-2000:] for o in outs]
    won, lost = (0, 1) if procs[0].returncode == 0 else (1, 0)
    line = one_error(outs[lost][1])
    assert f"pid {procs[won].pid}" in line and "in use by another training run" in line
    assert "compiling" not in outs[lost][0]  # refused before it built anything
    assert ends[lost] < ends[won]
    assert metric_steps(wd) == [1, 2, 3, 4, 5, 6]  # every step once
    assert steps_on_disk(wd) == [2, 4, 6] and not (wd / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ start-up path checks
def test_a_workdir_that_is_a_file_or_under_a_file_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    import crate_jax.train.loop as loop
    monkeypatch.setattr(loop, "Setup", lambda *a: pytest.fail("the model was built before the workdir was checked"))
    f = tmp_path / "afile"
    f.write_text("x")
    before = tree_digest(tmp_path)
    for wd, says in [(f, "is a file"), (f / "sub" / "run", "which is a file")]:
        assert train(wd) == 3
        line = one_error(capsys.readouterr().err)
        assert str(f) in line and says in line, line
    assert tree_digest(tmp_path) == before


def _read_only_prefix(directory: Path) -> list[str]:
    """A command prefix under which `directory` is read-only for the command: a chmod for a normal user;
    for root (who may write anywhere but to a read-only file system) a read-only bind mount in a private
    mount namespace."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"root without a way to make a read-only directory (unshare/mount: {probe.stderr[-200:]!r})")
    return ["unshare", "-m", "sh", "-c", script, str(directory)]


def test_a_read_only_workdir_is_refused_before_anything(tmp_path):
    base = tmp_path / "ro"
    (base / "run").mkdir(parents=True)
    (base / "run" / "config.json").write_text("{}")
    prefix = _read_only_prefix(base)
    if not prefix:
        (base / "run").chmod(0o555)
    before = tree_digest(base)
    env = cli_env(JAX_ENABLE_COMPILATION_CACHE="false")
    try:
        for wd, says in [(base / "run", "is not writable"), (base / "new" / "run", "cannot be created")]:
            r = subprocess.run(prefix + [sys.executable, "-m", "crate_jax.train", "--config", TINY, "--workdir",
                                         str(wd)], capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 3, r.stderr[-2000:]
            line = one_error(r.stderr)
            assert says in line and str(base) in line, line
            assert "compiling" not in r.stdout
        assert tree_digest(base) == before
    finally:
        base.chmod(0o755)
        (base / "run").chmod(0o755)


def test_check_workdir_accepts_new_and_existing_writable_paths(tmp_path):
    check_workdir(tmp_path)
    check_workdir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # the check creates nothing


def test_a_config_error_leaves_no_new_workdir(tmp_path, capsys):
    wd = tmp_path / "new" / "run"
    assert train(wd, "--config.optim.lr=-1") == 2
    assert error_lines(capsys.readouterr().err)[0].startswith("config error:")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ fits the workdir
def test_a_changed_seed_on_resume_is_refused_and_the_workdir_untouched(reference, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = tree_digest(wd)
    assert train(wd, "--config.seed=1") == 3
    line = one_error(capsys.readouterr().err)
    assert "seed: stored 0, now 1" in line and "config.json" in line, line
    assert tree_digest(wd) == before


def test_a_changed_data_stream_on_resume_is_refused_and_the_workdir_untouched(reference, tmp_path, capsys):
    """A workdir without config.json (written before it existed): the data-iterator state tells."""
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    (wd / "config.json").unlink()
    before = tree_digest(wd)
    assert train(wd, "--config.seed=1") == 3
    line = one_error(capsys.readouterr().err)
    assert "another data stream" in line and "seed: saved 0, now 1" in line, line
    assert tree_digest(wd) == before


@pytest.mark.parametrize("content", ["{}", "[1, 2]", '{"reader": 1}'])
def test_a_data_state_of_the_wrong_structure_is_set_aside_and_the_run_resumes(reference, tmp_path, capsys, content):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    data = next((wd / "checkpoints" / "6" / "data").glob("process_*.json"))
    data.write_text(content)
    assert train(wd) == 0
    out = capsys.readouterr().out
    assert "at step 4" in out and "wrong structure" in out
    (aside,) = (wd / "checkpoints.set_aside").iterdir()
    assert aside.name.startswith("6-") and "wrong structure" in (aside / "REASON.txt").read_text()
    assert (next((aside / "data").glob("process_*.json"))).read_text() == content  # kept as it was
    assert metric_steps(wd) == [1, 2, 3, 4, 5, 6]
    ref, got = losses(reference), losses(wd)
    np.testing.assert_allclose([got[s] for s in (5, 6)], [ref[s] for s in (5, 6)], rtol=1e-6)
    assert train(wd) == 0  # and the rerun is fine: no crash loop


# ------------------------------------------------------------------------------ failures during the run
@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_names_the_step_and_the_rerun_resumes(reference, tmp_path, capsys, monkeypatch,
                                                                         async_save):
    wd = tmp_path / "run"
    flag = f"--config.async_checkpoints={async_save}"
    monkeypatch.setenv("CRATE_JAX_TEST_DISK_FULL_AT_STEP", "4")
    assert train(wd, flag) == 3
    line = one_error(capsys.readouterr().err)
    assert "checkpoint of step 4 could not be written" in line and "no space left" in line, line
    assert "resumes from step 2" in line
    assert steps_on_disk(wd) == [2] and not (wd / LOCK_NAME).exists()
    monkeypatch.delenv("CRATE_JAX_TEST_DISK_FULL_AT_STEP")
    assert train(wd, flag) == 0
    assert "at step 2" in capsys.readouterr().out
    assert metric_steps(wd) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses(wd)[s] for s in range(1, 7)], [losses(reference)[s] for s in range(1, 7)],
                               rtol=1e-6)
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (wd / "checkpoints").iterdir())


def test_ctrl_c_during_the_first_compile_exits_130_cleanly(tmp_path):
    wd = tmp_path / "run"
    # The compile must still be running when the signal lands, however fast the machine: the test hook
    # stretches it (a tiny model compiles in well under a second).
    env = cli_env(JAX_ENABLE_COMPILATION_CACHE="false", CRATE_JAX_TEST_COMPILE_DELAY="60")
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored; the child gets
    # the default disposition back, as a run started from a terminal has it.
    p = subprocess.Popen([sys.executable, "-m", "crate_jax.train", "--config", TINY, "--workdir", str(wd)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("compiling the train step"):
            time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=300)
    out = "".join(seen) + out
    assert p.returncode == 130, (p.returncode, err[-3000:])
    line = one_error(err)
    assert "interrupted (Ctrl-C)" in line
    assert "compiled train step" not in out  # it stopped in the compile
    assert not (wd / LOCK_NAME).exists()


def test_ctrl_c_during_training_saves_at_the_step_boundary_and_exits_130(tmp_path, capsys, monkeypatch):
    import crate_jax.train.metrics as M
    write = M.MetricsWriter.write

    def write_then_interrupt(self, step, metrics):
        write(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, during step 3's bookkeeping
    monkeypatch.setattr(M.MetricsWriter, "write", write_then_interrupt)
    wd = tmp_path / "run"
    assert train(wd) == 130
    line = one_error(capsys.readouterr().err)
    assert "interrupted (Ctrl-C) at step 3" in line and "rerun" in line
    assert steps_on_disk(wd) == [2, 3] and metric_steps(wd) == [1, 2, 3] and not (wd / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ metrics
def test_a_steps_rows_are_merged_into_one_line(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    w.write(1, {"train/loss": 1.0})
    w.write(2, {"train/loss": 0.5})
    w.write(2, {"eval/val/top1": 0.25})
    w.write(3, {"train/loss": 0.25})
    w.close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5, "eval/val/top1": 0.25},
                    {"step": 3, "train/loss": 0.25}]
    w = MetricsWriter(tmp_path, enabled=True, resume_step=2)  # a resumed run drops step 3, keeps the merged 2
    w.write(3, {"train/loss": 0.125})
    w.close()
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
