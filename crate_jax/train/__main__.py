"""Train a model from a config file, or resume it from its workdir.

    python -m crate_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

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

import argparse
import logging
import os
import shlex
import sys


def _parser() -> argparse.ArgumentParser:
    from crate_jax.cli import tool_parser
    from crate_jax.train import config_cli
    p = tool_parser("crate_jax.train", __doc__, allow_abbrev=False)
    config_cli.add_config_arguments(p)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="checkpoints, metrics.jsonl, tensorboard/, config.json, model.json (local or gs://); "
                        "the same command on the same workdir resumes")
    multi = p.add_argument_group("multi-host", "start jax.distributed explicitly, e.g. on CPU / GPU hosts (all three "
                                               "together; TPU pods and SLURM jobs are detected without them)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    p.add_argument("--local-devices", type=int, metavar="N", help="CPU only: simulate N local devices")
    return p


def _maybe_initialize_distributed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Sets the local CPU device count and starts jax.distributed: from the multi-host flags, or when the
    environment says this is one process of several (TPU pod, SLURM, CRATE_JAX_DISTRIBUTED=1)."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if 0 < len(missing) < len(given):
        parser.error(f"--coordinator, --num-processes and --process-id go together; missing {', '.join(missing)}")
    import jax
    if args.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if not missing:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif os.environ.get("CRATE_JAX_DISTRIBUTED") == "1" or \
            any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) or \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


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
    command = shlex.join([os.path.basename(sys.executable), "-m", "crate_jax.train", *argv])
    from crate_jax.models import ConfigError
    from crate_jax.train import config_cli
    parser = _parser()
    args, overrides = config_cli.parse_args(parser, argv)  # usage errors: exit 2 here
    _maybe_initialize_distributed(args, parser)
    config = config_cli.config_from_args(args, overrides)  # a ConfigError: `config error:`, exit 2
    from crate_jax.parallel.mesh import MeshError
    from crate_jax.train.loop import train_and_evaluate
    if not debug:
        _quiet_library_tracebacks()
    try:
        out = train_and_evaluate(config, args.workdir, command=command)
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
