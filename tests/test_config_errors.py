"""Config errors are caught before anything compiles or the workdir changes, with a `config error:` line
naming the key and exit code 2: a walk over every config under configs/ with a bad value for each
validated key; and the command-line surface (help, overrides of absent / None keys, configs from any
directory, recipe class counts)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate_jax.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "common"))

# (key, bad value): every key the engine validates, whatever the task.
ENGINE_BAD = [
    ("batch_size", "0"), ("batch_size", "-3"), ("total_steps", "-5"), ("total_steps", "0"), ("num_epochs", "-1"),
    ("log_every", "0"), ("checkpoint_every", "0"), ("keep_checkpoints", "0"), ("keep_checkpoints", "-1"),
    ("keep_period", "0"), ("eval_every", "-1"), ("eval_batch_size", "100"), ("eval_batch_size", "0"),
    ("seed", "-1"), ("microbatches", "0"), ("microbatches", "7"), ("optim.lr", "-1"), ("optim.lr", "nan"),
    ("optim.min_lr", "-0.5"), ("optim.warmup_steps", "-1"), ("optim.b1", "1.5"), ("optim.b2", "-0.1"),
    ("optim.wd", "-0.1"), ("optim.clip", "-1"), ("optim.name", "sgd"), ("optim.schedule", "quadratic"),
    ("optim.mu_dtype", "int8"), ("optim.wd_mask", "(unclosed"), ("optim.lrr", "0.1"), ("mesh.data", "3"),
    ("mesh.tensor", "0"), ("mesh.pipeline", "2"), ("task", "nope"), ("init.posemb_resample", "3d"),
    ("init.dont_load", "(x"), ("async_checkpoints", "maybe"), ("not_a_key", "1"),
]
# Per task family: keys of its model / data / loss sections.
TASK_BAD = {
    "classification": [("model.variant", "Q/16"), ("model.name", "resnet"), ("model.widht", "8"),
                       ("model.num_classes", "0"), ("res", "30"), ("data.source", "web"), ("data.flip", "sideways"),
                       ("loss.label_smoothing", "1.5"), ("loss.mixup.switch_prob", "2"), ("loss.smoothing", "0.1"),
                       ("evals.val.type", "nope"), ("evals.val.split", "")],
    "clip": [("model.image.variant", "Q/16"), ("model.text.variant", "Z"), ("model.loss", "hinge"), ("res", "30"),
             ("data.source", "web"), ("data.shuffle_buffer", "0"), ("data.area_min", "0"), ("data.shufle", "1"),
             ("txt_len", "0")],
}


def _task_of(name):
    from crate_jax.train import config_cli
    return config_cli.load(f"configs/{name}.py").get("task", "classification")


def _expected_key(key: str) -> str:
    """What the message must name: the key's first part (a section or a top-level key)."""
    top = key.split(".")[0]
    return {"mesh": "config.mesh", "not_a_key": "not_a_key", "async_checkpoints": "async_checkpoints"}.get(
        top, f"config.{top}")


def _cases():
    for name in CONFIGS:
        task = _task_of(name)
        for key, bad in ENGINE_BAD + TASK_BAD.get(task, []):
            yield pytest.param(name, key, bad, id=f"{name}-{key}={bad}")


# Configs whose class count is read from a dataset that is not on this machine: the walk gives it, so that
# each case reaches the key it tests (test_unprepared_dataset_is_a_config_error covers the data route).
CLASS_COUNT = {"transfer": "--config.model.num_classes=10"}


@pytest.mark.parametrize("name, key, bad", list(_cases()))
def test_every_config_refuses_a_bad_value_before_compiling(name, key, bad, tmp_path, capsys):
    wd = tmp_path / "wd"
    extra = [CLASS_COUNT[name]] if name in CLASS_COUNT and key != "model.num_classes" else []
    # total_steps=1 first: if a bad value ever slipped through, the run would end after one step, not train
    code = train_main(["--config", f"configs/{name}.py", "--workdir", str(wd), "--config.total_steps=1", *extra,
                       f"--config.{key}={bad}"])
    out, err = capsys.readouterr()
    assert code == 2, (err, out)
    assert err.startswith("config error:"), err
    assert _expected_key(key) in err, err
    assert "compiled train step" not in out and not wd.exists()


def test_unprepared_dataset_is_a_config_error(tmp_path, capsys):
    """The transfer recipe reads its class count from TFDS: an empty data_dir is named, with how to prepare it."""
    pytest.importorskip("tensorflow_datasets")
    empty, wd = tmp_path / "tfds", tmp_path / "wd"
    empty.mkdir()
    code = train_main(["--config", f"configs/transfer.py:dataset=pets,data_dir={empty}", "--workdir", str(wd)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("config error:"), err
    assert "config.model.num_classes" in err and "oxford_iiit_pet" in err and str(empty) in err, err
    assert "tfds build" in err and not wd.exists()


def test_help_and_usage():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, "-m", "crate_jax.train", flag, "--config", "configs/digits.py"],
                           capture_output=True, text=True, cwd=REPO, env=env)
        assert r.returncode == 0 and "usage: python -m crate_jax.train" in r.stdout and "handwritten digits" in r.stdout
        assert "Traceback" not in r.stderr


def test_configs_resolve_from_any_directory(tmp_path):
    """`--config configs/FILE.py` (or an absolute path) works outside the repository root; the configs
    package is installed with crate_jax."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    code = "from crate_jax.configs import clipa, digits; print(digits.get_config().res)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "16", r.stderr
    for spec in ("configs/digits.py", str(REPO / "configs" / "digits.py")):
        r = subprocess.run([sys.executable, "-m", "crate_jax.train", "--config", spec, "--workdir", str(tmp_path / "w"),
                            "--config.total_steps=-5"], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert r.returncode == 2 and "config error: config.total_steps" in r.stderr, r.stderr
        assert "ModuleNotFoundError" not in r.stderr and not (tmp_path / "w").exists()


def test_overrides_reach_absent_and_none_keys(monkeypatch):
    from crate_jax.errors import ConfigError
    from crate_jax.train import config_cli
    c = config_cli.load_with_overrides("configs/digits.py", ["--config.model.scan=True", "--config.optim.lr=3e-3",
                                                             "--config.data.randaug=(2,9)", "--config.keep_period=5"])
    assert c.model.scan is True and c.optim.lr == 3e-3 and tuple(c.data.randaug) == (2, 9) and c.keep_period == 5
    c = config_cli.load_with_overrides("configs/clipa.py", ["--config.data.num_threads=4", "--config.model.text.remat",
                                                            "full"])
    assert c.data.num_threads == 4 and c.model.text.remat == "full"
    c = config_cli.load_with_overrides("configs/clipa.py", ["--set", "mesh.data=64", "--set=mesh.fsdp=1",
                                                            "--config.mesh.tensor=1"])
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (64, 1, 1)  # --set KEY=VALUE is --config.KEY=VALUE
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_cli.load_with_overrides("configs/digits.py", ["--set", "mesh.fsdp"])
    with pytest.raises(ConfigError, match="expected an integer"):
        config_cli.load_with_overrides("configs/digits.py", ["--config.batch_size=many"])
    with pytest.raises(ConfigError, match="unknown key"):
        config_cli.load_with_overrides("configs/digits.py", ["--config.bogus=1"])
    with pytest.raises(ConfigError, match="no such file"):
        config_cli.load("configs/nope.py")
    with pytest.raises(ConfigError, match="unknown config argument 'varient'"):
        config_cli.load("configs/imagenet21k.py:varient=B/16")


def test_recipe_configs_know_their_class_counts():
    """AOT / benches build the ImageNet recipes without the dataset (docs/vision.md §Recipes)."""
    from crate_jax.train import config_cli
    from crate_jax.train.setup import make_task
    for spec, n in (("configs/imagenet1k.py:variant=B/16", 1000), ("configs/imagenet21k.py:variant=B/16", 19_167),
                    ("configs/crate_imagenet1k.py", 1000)):
        task = make_task(config_cli.load(spec))
        assert task.model_cfg.num_classes == n, spec
