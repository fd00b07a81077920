"""`python -m crate_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]`.

Re-running the same command on the same workdir resumes from its newest restorable checkpoint.
Launched as several processes (TPU pod, SLURM, or `--coordinator/--num-processes/--process-id`),
it calls `jax.distributed.initialize()` first.

One run per workdir: a second run on a workdir in use is refused at once (see
`crate_jax.train.workdir`). Every failure ends with one `error:` (or `config error:`) line on stderr;
tracebacks only with `--debug`.

Exit codes (`crate_jax.errors`): 0 done (or stopped on SIGTERM with a checkpoint); 2 a config, usage
or data error (reported before anything compiles or the workdir changes); 3 the workdir or its state
cannot be used (a path that is a file or not writable, a workdir in use by another run or written by
another one, a changed seed or data stream on resume, every checkpoint damaged, a non-finite loss, a
checkpoint that could not be written: a full disk); 130 Ctrl-C (after a checkpoint when a step had
finished); 1 a bug.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

USAGE = """usage: python -m crate_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
           [--coordinator HOST:PORT --num-processes N --process-id I] [--local-devices N]

  --config FILE.py[:ARGS]   a config file defining get_config(ARGS), e.g. configs/digits.py:steps=200
                            (with --help, its docstring is printed too)
  --workdir DIR             checkpoints, metrics.jsonl, tensorboard/, config.json, model.json (local or gs://)
  --config.KEY=VALUE        override one config value, e.g. --config.optim.lr=1e-3 --config.model.scan=True
  --coordinator/--num-processes/--process-id   start jax.distributed explicitly (multi-host on CPU/GPU)
  --local-devices N         CPU only: simulate N local devices
  --debug                   print the traceback of a failure"""


def _maybe_initialize_distributed(argv: list[str]) -> list[str]:
    """Consumes --coordinator/--num-processes/--process-id/--local-devices and initialises jax.distributed."""
    opts, rest, i = {}, [], 0
    names = {"--coordinator": "coordinator_address", "--num-processes": "num_processes",
             "--process-id": "process_id", "--local-devices": "local_devices"}
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in names:
            if "=" not in a and i + 1 >= len(argv):
                raise SystemExit(f"config error: {key} needs a value\n{USAGE}")
            val = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            opts[names[key]] = val
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    import jax
    if "local_devices" in opts:
        jax.config.update("jax_num_cpu_devices", int(opts.pop("local_devices")))
    if opts:
        missing = {"coordinator_address", "num_processes", "process_id"} - set(opts)
        if missing:
            raise SystemExit(f"config error: distributed start needs --coordinator, --num-processes and "
                             f"--process-id together; missing {sorted(missing)}")
        jax.distributed.initialize(coordinator_address=opts["coordinator_address"],
                                   num_processes=int(opts["num_processes"]), process_id=int(opts["process_id"]))
    elif os.environ.get("CRATE_JAX_DISTRIBUTED") == "1" or \
            any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) or \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()
    return rest


def _help(argv: list[str]) -> str:
    text = (__doc__ or "").strip() + "\n\n" + USAGE
    from crate_jax.train import config_cli
    try:
        spec, _ = config_cli.take_option([a for a in argv if a not in ("-h", "--help")], "config")
        if spec:
            import importlib.util
            path = config_cli.resolve_path(spec.partition(":")[0])
            mod_spec = importlib.util.spec_from_file_location("_crate_jax_help_config", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
            text += f"\n\n{path}:\n{(module.__doc__ or '(no docstring)').strip()}"
    except Exception as e:  # noqa: BLE001 - help must always print
        text += f"\n\n(the config's docstring could not be read: {e})"
    return text


def main(argv=None) -> int:
    """The command, returning its exit code (failures become one `error:` line; see the module docstring)."""
    from crate_jax import errors
    argv, debug = errors.take_debug(argv)
    return errors.run(lambda a: _main(a, debug=debug), argv + ([errors.DEBUG_FLAG] if debug else []))


class _OrbaxErrorsReportedOnce(logging.Filter):
    """Orbax logs (through absl) a failed write with its traceback before the failure reaches the loop,
    which reports it in one `error:` line: without --debug those records are dropped, and no absl record
    carries a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_library_tracebacks() -> None:
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrorsReportedOnce) for f in absl.filters):
        absl.addFilter(_OrbaxErrorsReportedOnce())


def _main(argv: list[str], *, debug: bool = False) -> int:
    if "-h" in argv or "--help" in argv:
        print(_help(argv))
        return 0
    command = shlex.join([os.path.basename(sys.executable), "-m", "crate_jax.train", *argv])
    from crate_jax.models import ConfigError
    from crate_jax.train import config_cli
    try:
        argv = _maybe_initialize_distributed(argv)
        overrides, rest = config_cli.split_overrides(argv)
        spec, rest = config_cli.take_option(rest, "config")
        workdir, rest = config_cli.take_option(rest, "workdir")
        if rest:
            raise ConfigError(f"unknown arguments {rest}")
        if spec is None or workdir is None:
            raise ConfigError("--config and --workdir are both required")
        config = config_cli.load_with_overrides(spec, overrides)
    except ConfigError as e:
        print(f"config error: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    from crate_jax.parallel.mesh import MeshError
    from crate_jax.train.loop import train_and_evaluate
    if not debug:
        _quiet_library_tracebacks()
    try:
        out = train_and_evaluate(config, workdir, command=command)
    except MeshError as e:
        raise ConfigError(str(e)) from e
    if out.get("stop_signal") == "SIGINT":
        print(f"error: interrupted (Ctrl-C) at step {out['stopped_at']}; its checkpoint is saved: rerun the same "
              f"command to resume", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(lambda argv: _main(argv, debug=errors.DEBUG_FLAG in sys.argv[1:]))
