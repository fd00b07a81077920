"""The README's guarantees under faults, each class through the public CLI where the fault is the user's:
damaged checkpoints are set aside (never deleted) and the run resumes from the newest good step with
the uninterrupted run's losses; a non-finite run never checkpoints a non-finite state; a workdir of
another run is refused untouched; bad outputs are errors, not silent NaN files; shared outputs get
the usual permissions."""

import os
import re
import shutil
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crate_jax import analyze, convert, export, predict
from crate_jax.checkpoint.bundle import BundleError, load_config, save_bundle
from crate_jax.checkpoint.params import read_params
from crate_jax.checkpoint.training import TrainCheckpointer
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.setup import Setup
from crate_jax.train.__main__ import main as train_main
from crate_jax.train.metrics import read_metrics
from train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "tiny_digits.py")


def train(wd, *overrides) -> int:
    return train_main(["--config", TINY, "--workdir", str(wd), *overrides])


def losses(wd) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(wd) / "metrics.jsonl") if "train/loss" in r}


def steps_on_disk(wd) -> list[int]:
    return sorted(int(p.name) for p in (Path(wd) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run that keeps every step's checkpoint."""
    wd = tmp_path_factory.mktemp("ref") / "run"
    assert train(wd, "--config.checkpoint_every=1", "--config.keep_checkpoints=10") == 0
    assert steps_on_disk(wd) == [1, 2, 3, 4, 5, 6]
    return wd


# ------------------------------------------------------------------------------------ damaged steps
def _truncate_an_array_file(step_dir: Path):
    """Cuts the largest array data file (Orbax's OCDBT `d/` files) to a third."""
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: -p.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 3])


def _drop_metadata(step_dir: Path):
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_data_json(step_dir: Path):
    f = next((step_dir / "data").glob("process_*.json"))
    f.write_text(f.read_text()[:7])


def _drop_commit_marker(step_dir: Path):
    (step_dir / "commit_success.txt").unlink()


FAULTS = {6: _truncate_an_array_file, 5: _drop_metadata, 4: _truncate_data_json, 3: _drop_commit_marker}


def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_with_the_same_losses(reference, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    for step, damage in FAULTS.items():
        damage(wd / "checkpoints" / str(step))
    assert train(wd, "--config.checkpoint_every=1", "--config.keep_checkpoints=10") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    aside = {p.name.split("-")[0]: p for p in (wd / "checkpoints.set_aside").iterdir()}
    assert sorted(aside) == ["3", "4", "5", "6"]  # moved, not deleted
    reasons = {s: (aside[s] / "REASON.txt").read_text() for s in aside}
    assert "cannot be read" in reasons["6"] and "_METADATA" in reasons["5"]
    assert "cannot be read" in reasons["4"] and "commit_success.txt is missing" in reasons["3"]
    assert any((aside["6"] / "state").rglob("*"))  # the damaged files are all still there
    ref, got = losses(reference), losses(wd)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # each step once in metrics.jsonl
    for s in range(3, 7):
        np.testing.assert_allclose(got[s], ref[s], rtol=1e-6)
    assert steps_on_disk(wd) == [1, 2, 3, 4, 5, 6]  # re-saved where the damaged ones were: no collision
    assert train(wd, "--config.checkpoint_every=1", "--config.keep_checkpoints=10") == 0  # and again: no crash loop


def test_every_damage_class_alone_falls_back_one_step(tmp_path):
    """Unit level, no model: each class of damage on the newest of three steps restores the one before."""
    state = {"step": jnp.int32(0), "params": {"w": jnp.arange(65536.0).reshape(256, 256)}}  # big enough for a data file
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    for name, damage in [("array", _truncate_an_array_file), ("meta", _drop_metadata),
                         ("data", _truncate_data_json), ("commit", _drop_commit_marker)]:
        d = tmp_path / name / "checkpoints"
        ck = TrainCheckpointer(d, async_save=False)
        for s in (1, 2, 3):
            ck.save(s, {"step": jnp.int32(s), "params": {"w": state["params"]["w"] * s}}, {"next": s}, force=True)
        ck.close()
        damage(d / "3")
        ck = TrainCheckpointer(d, async_save=False)
        step, got, data = ck.restore(abstract)
        ck.close()
        assert (step, data) == (2, {"next": 2}), name
        np.testing.assert_array_equal(np.asarray(got["params"]["w"]), 2 * np.asarray(state["params"]["w"]))
        assert [p.name.split("-")[0] for p in (d.parent / "checkpoints.set_aside").iterdir()] == ["3"], name


# ------------------------------------------------------------------------------------ non-finite
def test_a_diverging_run_keeps_only_finite_checkpoints_and_resumes_from_the_last_good_one(tmp_path, capsys):
    wd = tmp_path / "nan"
    code = train(wd, "--config.total_steps=12", "--config.checkpoint_every=1", "--config.keep_checkpoints=20",
                 "--config.optim.lr=1e6", "--config.optim.warmup_steps=3")
    err = capsys.readouterr().err
    assert code == 3 and "non-finite" in err
    kept = steps_on_disk(wd)
    assert kept and f"last good checkpoint is step {kept[-1]}" in err
    cfg = tiny_config()
    setup = Setup(cfg, make_mesh(cfg.mesh))
    ck = TrainCheckpointer(wd / "checkpoints", async_save=False)
    for s in kept:  # every kept checkpoint restores to finite parameters
        state = ck.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["state"]["params"])), s
    ck.close()
    assert train(wd, "--config.total_steps=12", "--config.checkpoint_every=1", "--config.keep_checkpoints=20") == 0
    out = capsys.readouterr().out
    assert f"at step {kept[-1]}" in out
    assert "note: the config differs" in out and "optim.lr: 1000000.0 -> 0.002" in out  # a changed resume is said
    assert all(np.isfinite(v) for s, v in losses(wd).items() if s > kept[-1])


# ------------------------------------------------------------------------------------ other runs' workdirs
def test_a_mismatched_workdir_is_refused_and_left_untouched(reference, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = {p: (wd / p).read_bytes() for p in ("config.json", "model.json", "metrics.jsonl")}
    assert train(wd, "--config.model.width=48") == 3
    err = capsys.readouterr().err
    assert "written by a different run" in err and "Nothing in the workdir was changed" in err
    assert {p: (wd / p).read_bytes() for p in before} == before
    assert steps_on_disk(wd) == steps_on_disk(reference) and not (wd / "checkpoints.set_aside").exists()
    assert export.main(["--checkpoint", str(wd), "--format", "bundle", "--output", str(tmp_path / "b")]) == 0


# ------------------------------------------------------------------------------------ bad outputs
@pytest.fixture(scope="module")
def bundle(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert export.main(["--checkpoint", str(reference), "--format", "bundle", "--output", str(out)]) == 0
    return out


def _nan_bundle(bundle: Path, dest: Path) -> Path:
    params = jax.tree.map(lambda a: np.full_like(a, np.nan), read_params(bundle))
    dest.mkdir()
    shutil.copy(bundle / "model.json", dest / "model.json")
    with ocp.StandardCheckpointer() as c:
        c.save(dest.absolute() / "params", params)
    return dest


def test_predict_refuses_bad_input_and_nan_models_and_writes_nothing(bundle, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    run = lambda images, ckpt=bundle: predict.main(["--checkpoint", str(ckpt), "--images", str(images),
                                                    "--layout", "NHWC", "--output", str(out)])
    x = np.random.default_rng(0).standard_normal((5, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "ok.npy", x)
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "empty.npy", x[:0])
    np.savez(tmp_path / "z.npz", x=x)
    (tmp_path / "junk.npy").write_bytes(os.urandom(200))
    cases = {"nan.npy": "rows \\[3\\]", "empty.npy": "holds no images", "z.npz": "is a .npz",
             "junk.npy": "not a .npy file"}
    for name, msg in cases.items():
        assert run(tmp_path / name) == 2, name
        assert re.search(msg, capsys.readouterr().err), name
        assert not out.exists()
    nan_bundle = _nan_bundle(bundle, tmp_path / "nanb")
    assert run(tmp_path / "ok.npy", nan_bundle) == 2
    assert "hold NaN or inf" in capsys.readouterr().err and not out.exists()
    with pytest.raises(BundleError, match="refusing"):
        save_bundle(tmp_path / "nb2", load_config(bundle), jax.tree.map(lambda a: np.full_like(a, np.nan),
                                                                       read_params(bundle)))
    assert run(tmp_path / "ok.npy") == 0 and np.isfinite(np.load(out)).all()


def test_analyze_refuses_a_nan_model(bundle, tmp_path, capsys):
    nan_bundle = _nan_bundle(bundle, tmp_path / "nanb")
    x = (np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "im.npy", x)
    assert analyze.main(["--checkpoint", str(nan_bundle), "--images", str(tmp_path / "im.npy"),
                         "--out", str(tmp_path / "a"), "--max-plots", "0"]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err


def test_export_of_an_unreadable_workdir_is_a_clear_error(reference, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    for s in steps_on_disk(wd):  # every array file of every step cut short
        for f in (p for p in (wd / "checkpoints" / str(s) / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    assert export.main(["--checkpoint", str(wd), "--format", "bundle", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "Traceback" not in err and not (tmp_path / "b").exists()


def test_convert_names_a_file_that_is_not_an_npz(tmp_path, capsys):
    (tmp_path / "w.npz").write_bytes(os.urandom(300))
    assert convert.main(["--format", "crate-alpha-jax", "--input", str(tmp_path / "w.npz"),
                         "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a numpy .npz archive" in err and "pickled" not in err


def test_exported_files_and_bundles_are_shareable(bundle, reference, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    assert stat.S_IMODE(bundle.stat().st_mode) == want_dir
    for p in bundle.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (want_dir if p.is_dir() else want_file), p
    out = tmp_path / "w.safetensors"
    assert export.main(["--checkpoint", str(bundle), "--format", "crate-alpha-torch", "--output", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == want_file
    x = np.zeros((2, 16, 16, 3), np.float32)
    np.save(tmp_path / "x.npy", x)
    assert predict.main(["--checkpoint", str(bundle), "--images", str(tmp_path / "x.npy"), "--layout", "NHWC",
                         "--output", str(tmp_path / "l.npy")]) == 0
    assert stat.S_IMODE((tmp_path / "l.npy").stat().st_mode) == want_file


def test_read_params_works_on_any_device_count(reference, tmp_path):
    """A checkpoint written on 8 devices reads back (params only) in a process with 2 devices."""
    import subprocess
    import sys
    code = ("import numpy as np, jax; from crate_jax.checkpoint.params import read_params; "
            f"p = read_params({str(reference)!r}); print(len(jax.devices()), "
            "sum(np.asarray(x).size for x in jax.tree.leaves(p)))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    n_dev, n_params = r.stdout.split()
    here = sum(np.asarray(x).size for x in jax.tree.leaves(read_params(reference)))
    assert (int(n_dev), int(n_params)) == (2, here)
