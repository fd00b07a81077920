"""`python -m crate_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]`.

Re-running the same command on the same workdir resumes from its newest restorable checkpoint.
Launched as several processes (TPU pod, SLURM, or `--coordinator/--num-processes/--process-id`),
it calls `jax.distributed.initialize()` first.

Exit codes: 0 done (or stopped on SIGTERM with a checkpoint), 2 a config or usage error (reported
before anything compiles or the workdir changes), 3 a run that cannot continue (non-finite loss,
a workdir written by another run, a damaged checkpoint directory), 1 anything else.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m crate_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
           [--coordinator HOST:PORT --num-processes N --process-id I] [--local-devices N]

  --config FILE.py[:ARGS]   a config file defining get_config(ARGS), e.g. configs/digits.py:steps=200
                            (with --help, its docstring is printed too)
  --workdir DIR             checkpoints, metrics.jsonl, tensorboard/, config.json, model.json (local or gs://)
  --config.KEY=VALUE        override one config value, e.g. --config.optim.lr=1e-3 --config.model.scan=True
  --coordinator/--num-processes/--process-id   start jax.distributed explicitly (multi-host on CPU/GPU)
  --local-devices N         CPU only: simulate N local devices"""


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help(argv))
        return 0
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
    from crate_jax.checkpoint.training import CheckpointError
    from crate_jax.parallel.mesh import MeshError
    from crate_jax.train.loop import DataError, NonFiniteLoss, train_and_evaluate
    try:
        train_and_evaluate(config, workdir)
    except (ConfigError, MeshError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
