"""Packaging: the wheel installs only `crate_jax` (the recipes as `crate_jax.configs`), and a wheel install
trains, exports, loads and predicts from a project folder that has its own `configs` package; the package
list and `--config configs/X.py` resolution (the working directory first, then the bundled recipe)."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DIST_INFO = f"crate_jax-{PYPROJECT['project']['version']}.dist-info"


def test_package_list_is_the_tree():
    """The explicit package list (find cannot rename configs/) names every folder of crate_jax/ that holds
    files, plus crate_jax.configs mapped to the top-level configs/ folder."""
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"] == {"crate_jax.configs": "configs"}
    on_disk = {"crate_jax"} | {
        "crate_jax." + ".".join(d.relative_to(REPO / "crate_jax").parts)
        for d in (REPO / "crate_jax").rglob("*")
        if d.is_dir() and "__pycache__" not in d.parts and any(f.is_file() for f in d.iterdir())}
    listed = set(tool["packages"])
    assert listed == on_disk | {"crate_jax.configs"}, (
        f"pyproject.toml [tool.setuptools] packages: add {sorted(on_disk - listed)}, "
        f"remove {sorted(listed - on_disk - {'crate_jax.configs'})}")
    assert PYPROJECT["project"]["scripts"] == {"crate-jax": "crate_jax.cli:main"}
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and (REPO / "LICENSE").is_file()
    assert "wandb" in PYPROJECT["project"]["optional-dependencies"]


def test_nothing_imports_a_top_level_configs():
    """Recipes, tools, tests and benchmarks import `crate_jax.configs`: a top-level `configs` would be a
    project's own package once installed (the tests' path holds the checkout, which would hide the bug)."""
    import ast
    offenders = []
    for folder in ("crate_jax", "configs", "tests", "bench", "launch"):
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(n == "configs" or n.startswith("configs.") for n in names):
                    offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not offenders


def test_the_library_never_imports_the_demos():
    """The demos live in `crate_jax/demos/` and use the library; no library module imports them (the console
    command names them by module path only)."""
    import ast
    offenders = []
    for f in (REPO / "crate_jax").rglob("*.py"):
        if "demos" in f.relative_to(REPO / "crate_jax").parts:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            if any(n.startswith("crate_jax.demos") for n in names):
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not offenders
    assert sorted(p.stem for p in (REPO / "crate_jax" / "demos").glob("*.py")) == \
        ["__init__", "clipa", "lm", "mlm", "segmentation", "ssl"]


def test_config_paths_prefer_the_working_directory(tmp_path, monkeypatch):
    from crate_jax.errors import ConfigError
    from crate_jax.train import config_cli
    monkeypatch.chdir(tmp_path)
    bundled = config_cli.resolve_path("configs/digits.py")
    assert bundled == config_cli.bundled_dir() / "digits.py" and bundled.is_file()
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "digits.py"
    own.write_text("def get_config():\n    raise ValueError('mine')\n")
    assert config_cli.resolve_path("configs/digits.py") == own.resolve()
    with pytest.raises(ConfigError, match="no such file.*configs/nope.py.*the bundled configs are .*configs/lm.py"):
        config_cli.resolve_path("configs/nope.py")


def _copy_sources(dst: Path) -> None:
    """What the build reads (a copy, so that the build's egg-info / build/ never touch the checkout)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("crate_jax", "configs"):
        shutil.copytree(REPO / name, dst / name, ignore=skip)


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_install_works_beside_a_projects_own_configs(tmp_path):
    src, dist, target, project = tmp_path / "src", tmp_path / "dist", tmp_path / "site", tmp_path / "project"
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], tmp_path, env)
    wheel, = dist.glob("crate_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"crate_jax", DIST_INFO}, sorted(names)[:20]
    recipes = {Path(n).name for n in names if n.startswith("crate_jax/configs/")}
    assert {"__init__.py", "common.py", "digits.py", "clipa.py"} <= recipes
    # the recipes' own __init__, not the checkout's pointer to configs/ (crate_jax/configs/__init__.py)
    init = zipfile.ZipFile(wheel).read("crate_jax/configs/__init__.py").decode()
    assert init == (REPO / "configs" / "__init__.py").read_text() and "__path__" not in init
    assert "crate_jax/eval/assets/imagenet_classnames.txt" in names
    meta = zipfile.ZipFile(wheel).read(f"{DIST_INFO}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "Project-URL: Source," in meta
    assert "crate-jax = crate_jax.cli:main" in zipfile.ZipFile(wheel).read(f"{DIST_INFO}/entry_points.txt").decode()
    assert f"{DIST_INFO}/licenses/LICENSE" in names

    _run([*pip, "install", "--no-deps", "--no-compile", "--target", target, wheel], tmp_path, env)
    # A research project with its own configs package, whose common.py would break any recipe importing it.
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "__init__.py").write_text("")
    (project / "configs" / "common.py").write_text("raise ImportError('the project\\'s own configs.common')\n")
    # The wheel first on the path (ahead of the checkout's editable install), then the project folder.
    env.update(PYTHONPATH=f"{target}{os.pathsep}{project}", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    code = ("import json, configs, crate_jax, crate_jax.configs.digits as d; "
            "print(json.dumps([crate_jax.__file__, d.__file__, configs.__file__]))")
    where = _run([sys.executable, "-c", code], project, env)
    pkg, recipe, own = map(Path, json.loads(where.stdout))
    assert pkg.is_relative_to(target) and recipe == target / "crate_jax" / "configs" / "digits.py", where.stdout
    assert own == project / "configs" / "__init__.py"

    cli = target / "bin" / "crate-jax"
    r = _run([cli, "train", "--config", "configs/digits.py:steps=2,batch=8", "--workdir", "w",
              "--config.model.width=16", "--config.model.depth=1", "--config.model.num_heads=2",
              "--config.model.drop_path=0.0", "--config.async_checkpoints=false"], project, env)
    assert "done: step 2/2" in r.stdout, r.stdout
    _run([cli, "export", "--checkpoint", "w", "--format", "bundle", "--output", "bundle"], project, env)
    loaded = _run([sys.executable, "-c", "import crate_jax; cfg, model = crate_jax.load('bundle'); "
                   "print(crate_jax.__file__, type(model).__name__, cfg.num_classes)"], project, env)
    path, _, classes = loaded.stdout.split()
    assert Path(path).is_relative_to(target) and classes == "10", loaded.stdout

    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(project / "digit.png")
    _run([cli, "predict", "--checkpoint", "bundle", "--images", "digit.png", "--output", "top.json"], project, env)
    rows = json.loads((project / "top.json").read_text())["predictions"]
    assert len(rows) == 1 and len(rows[0]["top_k"]) == 5
    assert abs(sum(p["probability"] for p in rows[0]["top_k"])) <= 1.0 + 1e-6
