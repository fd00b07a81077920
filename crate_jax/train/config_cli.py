"""Configs from the command line: `--config FILE.py[:ARGS]` and `--config.KEY=VALUE` overrides.

Used by `python -m crate_jax.train`, `crate_jax.aot` and `crate_jax.sweep`, so every tool reads a
config the same way:

* `FILE.py` is a path that defines `get_config(arg)`. A relative path is looked up in the working
  directory first, so a project's own `./configs/X.py` wins; a `configs/X.py` that is not there is the
  bundled recipe `X.py` of the `crate_jax.configs` package (the repository's `configs/` folder, installed
  under crate_jax), so `--config configs/digits.py` works from any directory, in a checkout or from a
  wheel. Recipes import `crate_jax.configs.common`, never a top-level `configs`, so a project's own
  `configs` package cannot break them.
* `--config.a.b=VALUE` (or `--config.a.b VALUE`) sets one value. An existing value keeps its type
  (`True`/`false`/`1`/`0` for booleans, numbers checked, `(2,9)` or `2,9` for tuples); a key that is
  absent or None takes the Python literal the text spells (`4`, `1e-3`, `True`, `None`, `(2, 9)`),
  else the text itself. New keys are accepted inside the config's sections (`model`, `data`, `optim`,
  ...), whose own checks then name any key they do not know, and at the top level only for the keys
  the engine reads (`ENGINE_KEYS`).

Every problem is a `ConfigError` naming the file or key and what was expected.

A tool's parser takes these flags with `add_config_arguments(parser)`; `parse_args(parser, argv)` parses
its fixed flags and hands back the overrides (argparse's usage error, exit 2, for any other argument; with
`--help`, the config file's docstring follows the options); `config_from_args(args, overrides)` loads it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

from ml_collections import ConfigDict

from crate_jax.errors import ConfigError

# Top-level keys the engine or a task reads; an override may add these even when a config omits them.
ENGINE_KEYS = ("task", "seed", "res", "txt_len", "block", "batch_size", "total_steps", "num_epochs", "microbatches",
               "mesh", "optim", "loss", "init", "model", "data", "evals", "log_every", "eval_every",
               "eval_batch_size", "checkpoint_every", "keep_checkpoints", "keep_period", "async_checkpoints",
               "wandb")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


BUNDLED_PREFIX = "configs"  # `configs/X.py` names a bundled recipe when the working directory has none


def bundled_dir() -> Path:
    """The folder of the bundled recipes: the repository's `configs/` in a checkout or an editable
    install, `site-packages/crate_jax/configs` in a wheel install."""
    import crate_jax.configs  # its __path__, not its spec: in a checkout the package points at configs/
    return Path(next(iter(crate_jax.configs.__path__))).resolve()


def bundled_names() -> list[str]:
    """`configs/X.py` for every bundled recipe (`common.py` holds the shared pieces, not a recipe)."""
    return sorted(f"{BUNDLED_PREFIX}/{q.name}" for q in bundled_dir().glob("*.py")
                  if q.name not in ("__init__.py", "common.py"))


def resolve_path(path: str) -> Path:
    """The config file `path` names: as given (relative to the working directory), else, for
    `configs/X.py`, the bundled recipe X.py (see the module docstring)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    looked = [str((Path.cwd() / p).resolve()) if not p.is_absolute() else str(p)]
    if not p.is_absolute() and len(p.parts) > 1 and p.parts[0] == BUNDLED_PREFIX:
        bundled = bundled_dir().joinpath(*p.parts[1:])
        if bundled.is_file():
            return bundled
        if str(bundled.resolve()) not in looked:  # in a checkout run from its root, the two are one path
            looked.append(str(bundled))
    names = bundled_names()
    hint = did_you_mean(f"{BUNDLED_PREFIX}/{p.name}", names) if len(p.parts) > 1 else ""
    raise ConfigError(f"--config {path}: no such file (looked for {' and '.join(looked)}){hint}; the bundled "
                      f"configs are {names}")


def load(spec: str) -> ConfigDict:
    """`'configs/digits.py:steps=10'` -> the ConfigDict its `get_config('steps=10')` returns."""
    if not spec:
        raise ConfigError("--config is empty; expected configs/FILE.py[:ARGS]")
    path_text, _, arg = spec.partition(":")
    path = resolve_path(path_text)
    name = f"_crate_jax_config_{abs(hash(str(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file: name it and the error
        raise ConfigError(f"{path}: cannot be loaded: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    try:
        config = module.get_config(arg) if arg or _takes_arg(module.get_config) else module.get_config()
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"{path}: get_config({arg!r}): {e}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config returned a {type(config).__name__}, expected an ml_collections "
                          f"ConfigDict")
    return config


def _takes_arg(fn) -> bool:
    import inspect
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return True


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current, key: str):
    """`text` as the type of `current` (the value being replaced; None: any literal)."""
    if current is None:
        return _literal(text)
    if isinstance(current, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"--config.{key}={text}: expected a boolean (true / false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            value = _literal(text)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"--config.{key}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, (tuple, list)):
        value = _literal(text if text.strip().startswith(("(", "[")) else f"({text},)")
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"--config.{key}={text}: expected a sequence such as (2, 9)")
        return type(current)(value)
    if isinstance(current, (ConfigDict, dict)):
        raise ConfigError(f"--config.{key} is a section, not a value; set its keys (--config.{key}.NAME=VALUE)")
    return text


def did_you_mean(name: str, choices) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices`, or `""`."""
    import difflib
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def set_value(config: ConfigDict, key: str, text: str) -> None:
    """Applies `--config.KEY=TEXT` (see the module docstring)."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--config.{key}: not a valid key")
    node = config
    for i, part in enumerate(parts[:-1]):
        if part not in node or node[part] is None:
            if i == 0 and part not in ENGINE_KEYS:
                raise ConfigError(f"--config.{key}: unknown key {part!r}{did_you_mean(part, list(config.keys()) + list(ENGINE_KEYS))}; "
                                  f"this config has {sorted(config.keys())}")
            with node.ignore_type():
                node[part] = ConfigDict()
        node = node[part]
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"--config.{'.'.join(parts[:i + 1])} is a value, not a section")
    last = parts[-1]
    if len(parts) == 1 and last not in config and last not in ENGINE_KEYS:
        raise ConfigError(f"--config.{key}: unknown key{did_you_mean(last, list(config.keys()) + list(ENGINE_KEYS))}; "
                          f"this config has {sorted(config.keys())} (the engine also "
                          f"reads {sorted(set(ENGINE_KEYS) - set(config.keys()))})")
    current = node.get(last, None) if last in node else None
    value = parse_value(text, current, key)
    with node.ignore_type():
        node[last] = value


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """`--config.KEY=VALUE` / `--config.KEY VALUE` (or `--set KEY=VALUE`) pairs out of `argv`, and the remaining
    arguments."""
    pairs, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--set" or a.startswith("--set="):
            text = a[len("--set="):] if a.startswith("--set=") else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if a.startswith("--set=") else 2
            key, eq, value = text.partition("=")
            if not eq or not key:
                raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. --set mesh.fsdp=8)")
            pairs.append((key, value))
            continue
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a}: expected a value (--config.KEY=VALUE)")
                value = argv[i + 1]
                i += 1
            pairs.append((key, value))
        else:
            rest.append(a)
        i += 1
    return pairs, rest


def load_with_overrides(spec: str, overrides: list[tuple[str, str]] | list[str]) -> ConfigDict:
    """The config of `spec` with `overrides` (pairs, or `--config.KEY=VALUE` strings) applied in order."""
    config = load(spec)
    if overrides and isinstance(overrides[0], str):
        overrides, rest = split_overrides(list(overrides))
        if rest:
            raise ConfigError(f"not config overrides: {rest}")
    for key, value in overrides:
        set_value(config, key, value)
    return config


def take_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """`--name=VALUE` / `--name VALUE` out of `argv` (the last one wins)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{name}":
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name}: expected a value")
            value = argv[i + 1]
            i += 2
            continue
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


CONFIG_HELP = ("a config file defining get_config(ARGS), e.g. configs/digits.py:steps=200 (configs/X.py not in the "
               "working directory: the bundled recipe X.py; with --help, the file's docstring is printed too)")
OVERRIDES_HELP = ("--config.KEY=VALUE (or --config.KEY VALUE), repeatable: set one config value, e.g. "
                  "--config.optim.lr=1e-3 --config.model.scan=True (--set optim.lr=1e-3 is the same); an unknown key "
                  "is named with the closest ones")


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True, default: str | None = None,
                         help: str = CONFIG_HELP) -> None:
    """`--config FILE.py[:ARGS]` on `parser`, and a help section for the `--config.KEY=VALUE` overrides (which
    `parse_args` collects: argparse cannot name them in advance)."""
    parser.add_argument("--config", metavar="FILE.py[:ARGS]", required=required, default=default, help=help)
    parser.add_argument_group("config overrides", OVERRIDES_HELP)


def _is_help(a: str) -> bool:
    return a in ("-h", "--help")


def config_doc(argv: list[str]) -> str:
    """The docstring of the config file `--config` names in `argv`, for `--help` ("" without `--config`)."""
    try:
        spec, _ = take_option([a for a in argv if not _is_help(a)], "config")
        if not spec:
            return ""
        path = resolve_path(spec.partition(":")[0])
        module_spec = importlib.util.spec_from_file_location("_crate_jax_help_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return f"{path}:\n{(module.__doc__ or '(no docstring)').strip()}"
    except Exception as e:  # noqa: BLE001 - help must always print
        return f"(the config's docstring could not be read: {e})"


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """`parser`'s own flags out of `argv`, and the `--config.KEY=VALUE` overrides (in order) from the rest.
    Any other argument is argparse's usage error (exit 2); `--help` prints the config file's docstring too."""
    argv = list(argv)
    if parser.usage is None:  # argparse's usage line, and the overrides it cannot list itself
        parser.usage = f"{parser.format_usage().removeprefix('usage: ').rstrip()} [--config.KEY=VALUE ...]"
    if any(map(_is_help, argv)):
        doc = config_doc(argv)
        if doc:
            parser.epilog = f"{parser.epilog}\n\n{doc}" if parser.epilog else doc
    args, rest = parser.parse_known_args(argv)
    try:
        overrides, unknown = split_overrides(rest)
    except ConfigError as e:
        parser.error(str(e))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides are written --config.KEY=VALUE)")
    return args, overrides


def config_from_args(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> ConfigDict:
    """The config `args.config` names with `overrides` applied (`ConfigError`: exit 2, `config error:`)."""
    return load_with_overrides(args.config, overrides)


def eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
