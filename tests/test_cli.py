"""The `crate-jax` command: the list of commands (every tool with a `main`), unknown commands with a
suggestion and exit 2, a command's own `--help`, and a command's errors keeping their exit codes."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate_jax import cli, errors

PKG = Path(cli.__file__).resolve().parent


def _tools() -> set[str]:
    """Modules of crate_jax that define main() and run it under `if __name__ == "__main__"`."""
    found = set()
    for f in PKG.rglob("*.py"):
        if "__pycache__" in f.parts or f.name == "__main__.py" and f.parent == PKG:
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if has_main and guarded and f != PKG / "cli.py":
            found.add(".".join(("crate_jax", *f.relative_to(PKG).with_suffix("").parts)))
    return found


def test_every_tool_is_a_command():
    modules = {module for module, _ in cli.COMMANDS.values()}
    assert modules == _tools()
    assert all(name == name.lower() and " " not in name for name in cli.COMMANDS)


def test_help_lists_every_command_with_one_line(capsys):
    assert errors.run(cli.dispatch, ["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        summary = line.split(None, 1)[1]
        assert len(summary) > 20 and summary == cli.summary(name), line
    assert "Import official CRATE / CRATE-α weights into a crate_jax bundle." in out  # convert's docstring
    assert errors.run(cli.dispatch, []) == 2 and "commands:" in capsys.readouterr().out  # no command: usage


def test_unknown_command_suggests_the_closest(capsys):
    assert errors.run(cli.dispatch, ["trian", "--config", "x.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unknown command 'trian'" in err and "did you mean 'train'" in err
    assert errors.run(cli.dispatch, ["expor"]) == 2
    assert "did you mean 'export'" in capsys.readouterr().err
    assert errors.run(cli.dispatch, ["zzzzzz"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "crate-jax --help" in err


def test_a_commands_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as e:
        errors.run(cli.dispatch, ["info", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--variant" in out and "--image-size" in out
    with pytest.raises(SystemExit) as e:
        errors.run(cli.dispatch, ["help", "train"])  # `help COMMAND` is `COMMAND --help`
    assert e.value.code == 0 and "--workdir" in capsys.readouterr().out
    assert sys.argv[0] != "crate-jax train"  # restored after the command


def test_a_commands_errors_keep_their_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = errors.run(cli.dispatch, ["train", "--config", "configs/nope.py", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "configs/nope.py" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_python_dash_m_crate_jax_is_the_command():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "crate_jax", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == f"crate_jax {cli.__version__}", r.stderr
    r = subprocess.run([sys.executable, "-m", "crate_jax", "sweeep"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith("(crate-jax --help lists the commands)"), r.stderr
    assert "did you mean 'sweep'" in r.stderr and "Traceback" not in r.stderr


def test_debug_reaches_a_command_that_runs_its_own_error_handling(capsys, monkeypatch):
    """`crate-jax CMD --debug`: the traceback is printed even by a command whose main() wraps itself in
    errors.run (as train's does), though the outer run took --debug out of its arguments."""
    import types
    tool = types.ModuleType("crate_jax_fake_tool")
    tool.main = lambda argv: errors.run(lambda a: 1 / len(a), argv)
    monkeypatch.setitem(sys.modules, tool.__name__, tool)
    monkeypatch.setitem(cli.COMMANDS, "boom", (tool.__name__, "fails"))
    assert errors.run(cli.dispatch, ["boom"]) == 1
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError" in err and "Traceback" not in err
    assert errors.run(cli.dispatch, ["boom", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unexpected ZeroDivisionError" in err
    assert errors.run(cli.dispatch, ["boom"]) == 1 and "Traceback" not in capsys.readouterr().err  # not sticky
