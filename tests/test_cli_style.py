"""One command-line style for every tool (`crate-jax COMMAND` == `python -m MODULE`): an argparse parser
(built by `crate_jax.cli.tool_parser`), kebab-case options that each carry help text, argparse's usage
errors (exit 2, one `error:` line), and `--config FILE.py[:ARGS] [--config.KEY=VALUE ...]` read by the one
helper in `crate_jax.train.config_cli`. Parsers are captured as each tool's `main` builds them: the parse
is stopped before anything runs, so this stays fast."""

import argparse
import importlib
import re

import pytest

from crate_jax import cli, errors
from crate_jax.train import config_cli

OPTION = re.compile(r"^(-[A-Za-z0-9]|--[a-z0-9]+(-[a-z0-9]+)*)$")  # -x, --kebab-case
CONFIG_TOOLS = ("train", "aot", "sweep")


class Built(SystemExit):
    """Raised in place of parsing; a SystemExit, so that `errors.run` (which train's main wraps itself
    in) lets it through as it lets argparse's own exits through."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(0)
        self.parser = parser


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    def stop(self, *args, **kwargs):
        raise Built(self)
    patch = pytest.MonkeyPatch()
    patch.setattr(argparse.ArgumentParser, "parse_args", stop)
    patch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    built = {}
    try:
        for name, (module, _) in cli.COMMANDS.items():
            try:
                importlib.import_module(module).main(["--help"])
            except Built as b:
                built[name] = b.parser
    finally:
        patch.undo()
    return built


def _all(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and its subcommands' parsers."""
    return [("", parser)] + [(f" {name}", sub) for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                             for name, sub in a.choices.items()]


def test_every_command_parses_with_argparse(parsers):
    assert set(parsers) == set(cli.COMMANDS), sorted(set(cli.COMMANDS) - set(parsers))


def test_every_option_is_kebab_case_with_help(parsers):
    bad = []
    for name, parser in parsers.items():
        for sub, p in _all(parser):
            for action in p._actions:
                if not action.option_strings or isinstance(action, argparse._HelpAction):
                    continue
                if action.help == argparse.SUPPRESS:  # a hidden alias of an old spelling
                    continue
                odd = [o for o in action.option_strings if not OPTION.match(o)]
                if odd or not (action.help or "").strip():
                    bad.append(f"{name}{sub}: {action.option_strings}" + (" not kebab-case" if odd else " no help"))
    assert not bad, "\n".join(bad)


def test_config_tools_share_the_config_flags(parsers):
    for name in CONFIG_TOOLS:
        p = parsers[name]
        assert "--config" in p._option_string_actions, name
        assert "config overrides" in [g.title for g in p._action_groups], name
        assert not p.allow_abbrev, name  # `--config.KEY` must never be read as an abbreviation


def test_config_args_and_overrides(capsys):
    p = argparse.ArgumentParser(prog="tool")
    config_cli.add_config_arguments(p)
    p.add_argument("--workdir", help="a directory")
    args, overrides = config_cli.parse_args(p, ["--config.optim.lr=1e-3", "--config", "configs/digits.py",
                                                "--config.model.scan", "True", "--workdir", "w"])
    assert (args.config, args.workdir) == ("configs/digits.py", "w")
    assert overrides == [("optim.lr", "1e-3"), ("model.scan", "True")]
    config = config_cli.config_from_args(args, overrides)
    assert config.optim.lr == 1e-3 and config.model.scan is True
    for argv, says in ((["--config", "c.py", "--bogus"], "unrecognized arguments: --bogus"),
                       (["--config", "c.py", "--config.optim.lr"], "--config.optim.lr: expected a value"),
                       ([], "required: --config")):
        with pytest.raises(SystemExit) as e:
            config_cli.parse_args(p, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("tool: error:") and says in err[-1], err
        assert sum("error:" in line for line in err) == 1 and err[0].startswith("usage: tool")
    assert "[--config.KEY=VALUE ...]" in p.format_usage()
    with pytest.raises(SystemExit) as e:
        config_cli.parse_args(p, ["--help", "--config", "configs/digits.py:model=vit"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config.KEY=VALUE (or --config.KEY VALUE)" in out
    assert "handwritten digits" in out  # the config file's docstring follows the options


def test_a_commands_help_names_how_it_was_started(capsys):
    for argv, usage in ((["aot", "--help"], "usage: crate-jax aot "), (["sweep", "-h"], "usage: crate-jax sweep ")):
        with pytest.raises(SystemExit) as e:
            errors.run(cli.dispatch, argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(usage) and "--debug" in out, out[:300]
    from crate_jax.aot import _parser
    assert _parser().prog == "python -m crate_jax.aot"


def test_train_usage_errors_before_jax_starts(capsys):
    from crate_jax.train.__main__ import main
    for argv, says in ((["--config", "configs/digits.py", "--workdir", "w", "--coordinator", "h:1"],
                        "--coordinator, --num-processes and --process-id go together; missing --num-processes"),
                       (["--config", "configs/digits.py", "--workdir", "w", "--local-devices", "two"],
                        "argument --local-devices: invalid int value: 'two'"),
                       (["--config", "configs/digits.py"], "required: --workdir")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and says in err[-1] and sum("error:" in line for line in err) == 1, err
