#!/usr/bin/env python3
"""Cloud TPU VM launcher for crate_jax: create, set up, run, watch, stop and delete a slice.

Stdlib only (argparse + subprocess), so it runs on a laptop without crate_jax installed:

  python launch/tpu_vm.py plan   --accelerator-type v5p-128
  python launch/tpu_vm.py create NAME --zone Z --project P --accelerator-type v5p-128 --spot
  python launch/tpu_vm.py setup  NAME --zone Z --project P --commit SHA [--repo-url URL]
  python launch/tpu_vm.py run    NAME --zone Z --project P --accelerator-type v5p-128 \\
      --config 'configs/clipa.py:variant=L/14,...' --workdir gs://BUCKET/runs/x [--config.K=V ...]
  python launch/tpu_vm.py tail   NAME --zone Z --project P [--worker all] [-f]
  python launch/tpu_vm.py status NAME --zone Z --project P [--queued]
  python launch/tpu_vm.py stop   NAME --zone Z --project P [--wait 600]
  python launch/tpu_vm.py delete NAME --zone Z --project P [--queued]

Every subcommand takes --dry-run: it prints the exact commands, one per line (shlex.join), and
runs nothing. `--zone` / `--project` default to $CLOUDSDK_COMPUTE_ZONE / $CLOUDSDK_CORE_PROJECT.
See launch/README.md for the walk-through.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: python launch/tpu_vm.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import remote_scripts
else:  # imported as launch.tpu_vm
    from . import remote_scripts
# The one slice-name parser (standard library only, so this works from a checkout without installing).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crate_jax.parallel import tpu_slices  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JAX_VERSION = "0.10.2"  # the jax that pyproject.toml pins
DEFAULT_PYTHON = "3.12"
DEFAULT_EXTRAS = "tpu,gcs"

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$")
_PROJECT_RE = re.compile(r"^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{7,40}$")
_REL_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OVERRIDE_RE = re.compile(r"^--config\.[A-Za-z_][A-Za-z0-9_.]*=.*$", re.DOTALL)
_VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
_GCS_RE = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$")


class LaunchError(Exception):
    """A bad flag or a missing prerequisite; the message says what to change."""


# ----------------------------------------------------------------------------- validation


def _check_target(args: argparse.Namespace) -> None:
    if not _NAME_RE.match(args.name):
        raise LaunchError(f"TPU name {args.name!r} is invalid: use lowercase letters, digits and "
                          "hyphens, starting with a letter (at most 63 characters)")
    if not args.zone:
        raise LaunchError("missing zone: pass --zone (e.g. --zone us-east5-a) or set "
                          "CLOUDSDK_COMPUTE_ZONE")
    if not _ZONE_RE.match(args.zone):
        raise LaunchError(f"--zone {args.zone!r} is not a zone name such as us-east5-a")
    if not args.project:
        raise LaunchError("missing project: pass --project PROJECT_ID or set "
                          "CLOUDSDK_CORE_PROJECT")
    if not _PROJECT_RE.match(args.project):
        raise LaunchError(f"--project {args.project!r} is not a Google Cloud project id "
                          "(6-30 lowercase letters, digits or hyphens)")


def _slice(args: argparse.Namespace) -> tpu_slices.TpuSlice:
    try:
        return tpu_slices.parse(args.accelerator_type)
    except tpu_slices.SliceError as e:
        raise LaunchError(f"--accelerator-type: {e}") from None


def _rel_path(flag: str, value: str) -> str:
    if not _REL_PATH_RE.match(value) or ".." in value.split("/"):
        raise LaunchError(f"{flag} {value!r} must be a plain path relative to the worker's home "
                          "directory (letters, digits, '_', '.', '-', '/'; no '..')")
    return value


def _warn(msg: str) -> None:
    print(f"tpu_vm.py: warning: {msg}", file=sys.stderr)


def _plan(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"# {line}", file=sys.stderr)


# ----------------------------------------------------------------------------- gcloud argv


def _where(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def _ssh(args: argparse.Namespace, script: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args),
            f"--worker={worker}", f"--command={script}"]


def _qr_name(args: argparse.Namespace) -> str:
    return args.qr_name or f"{args.name}-qr"


def build_create(args: argparse.Namespace) -> list[list[str]]:
    """`gcloud compute tpus tpu-vm create` (on-demand / --spot) or a queued-resource request."""
    spec = _slice(args)
    if args.spot and args.reserved:
        raise LaunchError("--spot and --reserved exclude each other: spot capacity is "
                          "preemptible, reserved capacity is what your reservation holds")
    if args.valid_until_duration and not args.queued:
        raise LaunchError("--valid-until-duration only applies to --queued requests")
    if args.zone not in spec.known_zones:
        _warn(f"zone {args.zone} is not one of the zones listed for {spec.generation} "
              f"({', '.join(spec.known_zones)}); check "
              "https://cloud.google.com/tpu/docs/regions-zones before paying for a request "
              "that cannot be filled")
    version = args.runtime_version or spec.runtime_version
    kind = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
    _plan([spec.describe(),
           f"{kind}{' via queued resource ' + _qr_name(args) if args.queued else ''}, "
           f"zone {args.zone}, project {args.project}, runtime {version}"])
    extra = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if args.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", _qr_name(args),
               *_where(args), f"--node-id={args.name}",
               f"--accelerator-type={spec.accelerator_type}", f"--runtime-version={version}",
               *extra]
        if args.valid_until_duration:
            cmd.append(f"--valid-until-duration={args.valid_until_duration}")
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
               f"--accelerator-type={spec.accelerator_type}", f"--version={version}", *extra]
    return [cmd]


def build_setup(args: argparse.Namespace) -> list[list[str]]:
    """Copies or clones the repo at a pinned commit on every worker and installs a venv there."""
    if not args.commit or not _COMMIT_RE.match(args.commit):
        raise LaunchError(f"--commit {args.commit!r} must be a commit hash (7-40 lowercase hex "
                          "digits), so every worker runs the same code, e.g. "
                          "--commit $(git rev-parse HEAD)")
    if not _VERSION_RE.match(args.jax_version):
        raise LaunchError(f"--jax-version {args.jax_version!r} must be an exact version such as "
                          f"{DEFAULT_JAX_VERSION}")
    if not _VERSION_RE.match(args.python):
        raise LaunchError(f"--python {args.python!r} must be a version such as 3.12")
    if not re.match(r"^[a-z0-9_-]+(,[a-z0-9_-]+)*$", args.extras):
        raise LaunchError(f"--extras {args.extras!r} must be a comma-separated list such as "
                          f"{DEFAULT_EXTRAS}")
    remote_dir = _rel_path("--remote-dir", args.remote_dir)
    venv = _rel_path("--venv", args.venv)
    common = dict(commit=args.commit, remote_dir=remote_dir, venv=venv,
                  python_version=args.python, jax_version=args.jax_version, extras=args.extras)
    if args.repo_url:
        _plan([f"every worker clones {args.repo_url} at {args.commit}"])
        return [_ssh(args, remote_scripts.setup_script(repo_url=args.repo_url, **common))]
    # No URL: ship this checkout's commit as a `git archive` tarball (works for private repos).
    archive_name = f"crate_jax-{args.commit}.tar.gz"
    local_archive = os.path.join(tempfile.gettempdir(), archive_name)
    _plan([f"archive commit {args.commit} of {REPO_ROOT} and copy it to every worker"])
    return [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", "--prefix=crate_jax/",
         f"--output={local_archive}", args.commit],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_archive,
         f"{args.name}:{archive_name}", *_where(args), "--worker=all"],
        _ssh(args, remote_scripts.setup_script(archive=archive_name, **common)),
    ]


def _check_config(config: str) -> None:
    path = config.split(":", 1)[0]
    if not path.endswith(".py") or os.path.isabs(path) or ".." in path.split("/"):
        raise LaunchError(f"--config {config!r} must be FILE.py[:ARGS] with FILE relative to the "
                          "repository root, e.g. 'configs/clipa.py:variant=L/14,stage=pretrain'")
    if not os.path.isfile(os.path.join(REPO_ROOT, path)):
        _warn(f"{path} is not in this checkout; it must exist at the commit installed on the "
              "workers")


def build_run(args: argparse.Namespace) -> list[list[str]]:
    """Starts one training process per host, detached, logging to ~/crate_jax_runs/RUN.log."""
    spec = _slice(args)
    _check_config(args.config)
    if args.workdir.startswith("gs://") and not _GCS_RE.match(args.workdir):
        raise LaunchError(f"--workdir {args.workdir!r}: the bucket name must be 3-222 lowercase "
                          "letters, digits, '.', '_' or '-', as in gs://my-bucket/runs/clipa_l14")
    if spec.multi_host and not args.workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir {args.workdir!r} must be a gs://BUCKET/... path: {spec.accelerator_type} "
            f"has {spec.hosts} hosts, and each writes its shards of every checkpoint into the "
            "same directory, which worker-local disks cannot provide")
    if not spec.multi_host and not args.workdir.startswith("gs://"):
        _warn(f"--workdir {args.workdir} is on the TPU VM's disk: it is lost when the VM is "
              "preempted or deleted, and a rerun cannot resume from it")
    if not _RUN_NAME_RE.match(args.run_name):
        raise LaunchError(f"--run-name {args.run_name!r} may only hold letters, digits, "
                          "'_', '.', '-'")
    env = {"PYTHONUNBUFFERED": "1"}
    if spec.multi_host:  # the train entry then calls jax.distributed.initialize() (GCE TPU metadata)
        env["CRATE_JAX_DISTRIBUTED"] = "1"
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY_RE.match(key):
            raise LaunchError(f"--env {item!r} must be KEY=VALUE with KEY a shell variable name")
        env[key] = value
    train_argv = ["-m", remote_scripts.TRAIN_MODULE, "--config", args.config,
                  "--workdir", args.workdir, *args.overrides]
    _plan([spec.describe(),
           f"{spec.hosts} process{'es' if spec.multi_host else ''} started with --worker=all; "
           f"log ~/{remote_scripts.log_path(args.run_name)} on each worker",
           "rerunning this same command on the same --workdir resumes from the last checkpoint"])
    script = remote_scripts.run_script(
        run_name=args.run_name, remote_dir=_rel_path("--remote-dir", args.remote_dir),
        venv=_rel_path("--venv", args.venv), train_argv=train_argv, env=env)
    return [_ssh(args, script)]


def build_tail(args: argparse.Namespace) -> list[list[str]]:
    """Prints (or follows) the log of worker N, or of all workers with hostname prefixes."""
    if args.worker != "all" and not args.worker.isdigit():
        raise LaunchError(f"--worker {args.worker!r} must be a worker index (0, 1, ...) or 'all'")
    if args.lines < 0:
        raise LaunchError("--lines must be >= 0")
    script = remote_scripts.tail_script(run_name=args.run_name, lines=args.lines,
                                        follow=args.follow, label_hosts=args.worker == "all")
    return [_ssh(args, script, worker=args.worker)]


def build_status(args: argparse.Namespace) -> list[list[str]]:
    """State of the queued resource (with --queued), of the node, and of the run on each host."""
    cmds = []
    if args.queued:
        cmds.append(["gcloud", "compute", "tpus", "queued-resources", "describe", _qr_name(args),
                     *_where(args)])
    cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args),
                 "--format=yaml(acceleratorType,state,health,runtimeVersion,schedulingConfig)"])
    if not args.no_workers:
        cmds.append(_ssh(args, remote_scripts.status_script(run_name=args.run_name)))
    return cmds


def build_stop(args: argparse.Namespace) -> list[list[str]]:
    """SIGTERM (checkpoint at the next step, then exit) or, with --kill, SIGKILL on every host."""
    if args.wait < 0:
        raise LaunchError("--wait must be >= 0 seconds")
    script = remote_scripts.stop_script(run_name=args.run_name,
                                        signal="KILL" if args.kill else "TERM", wait_s=args.wait)
    return [_ssh(args, script)]


def build_delete(args: argparse.Namespace) -> list[list[str]]:
    """Deletes the node, or with --queued the queued resource and its node (--force)."""
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", _qr_name(args),
                 *_where(args), "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args),
             "--quiet"]]


def print_plan(args: argparse.Namespace) -> int:
    spec = _slice(args)
    print(spec.describe())
    print(f"tensor cores: {spec.chips * (2 if spec.generation in ('v4', 'v5p') else 1)}, "
          f"zones listed: {', '.join(spec.known_zones)}")
    return 0


# ----------------------------------------------------------------------------- execution


def execute(commands: Sequence[Sequence[str]], dry_run: bool, keep_going: bool = False) -> int:
    """Prints (dry run) or runs the commands in order; stops at the first failure unless
    `keep_going`. Returns the exit code: 0, or the first failing command's code."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for tool in sorted({cmd[0] for cmd in commands}):
        if shutil.which(tool) is None:
            hint = (" (install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install, "
                    "then `gcloud auth login`)" if tool == "gcloud" else "")
            raise LaunchError(f"{tool!r} was not found on PATH{hint}; --dry-run prints the "
                              "commands without running them")
    first_failure = 0
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        code = subprocess.run(list(cmd), check=False).returncode
        if code != 0:
            print(f"tpu_vm.py: command failed with exit code {code}", file=sys.stderr)
            first_failure = first_failure or code
            if not keep_going:
                return code
    return first_failure


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpu_vm.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("name", help="TPU VM node name, e.g. clipa-l14")
        sp.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"),
                        help="zone, e.g. us-east5-a (default: $CLOUDSDK_COMPUTE_ZONE)")
        sp.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"),
                        help="project id (default: $CLOUDSDK_CORE_PROJECT)")
        sp.add_argument("--dry-run", action="store_true",
                        help="print the exact commands, one per line, and run nothing")
        return sp

    def accel(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--accelerator-type", required=True,
                        help="v4-N, v5p-N, v5litepod-N (or v5e-N) or v6e-N, e.g. v5p-128")

    def queued(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--queued", action="store_true",
                        help="the node belongs to a queued resource")
        sp.add_argument("--qr-name", help="queued resource id (default: NAME-qr)")

    def remote(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--remote-dir", default="crate_jax",
                        help="repository directory on each worker, relative to $HOME")
        sp.add_argument("--venv", default="crate_jax_venv",
                        help="virtualenv directory on each worker, relative to $HOME")

    def run_name(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--run-name", default="train",
                        help="names ~/crate_jax_runs/RUN.log and RUN.pid on each worker")

    sp = sub.add_parser("plan", help="print chips, hosts, runtime and zones of a slice")
    accel(sp)

    sp = target("create", "create the TPU VM slice (on-demand, --spot, or --queued)")
    accel(sp)
    queued(sp)
    sp.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
    sp.add_argument("--reserved", action="store_true", help="use the project's reservation")
    sp.add_argument("--runtime-version",
                    help="override the TPU software version (default: per generation)")
    sp.add_argument("--valid-until-duration",
                    help="with --queued: give up if not provisioned within this time, e.g. 6h")

    sp = target("setup", "install the repo at --commit and a venv on every worker")
    sp.add_argument("--commit", required=True, help="commit hash to install (git rev-parse HEAD)")
    sp.add_argument("--repo-url", help="clone this URL on the workers (default: copy a "
                                       "`git archive` of --commit from this checkout)")
    sp.add_argument("--jax-version", default=DEFAULT_JAX_VERSION, help="exact jax[tpu] version")
    sp.add_argument("--python", default=DEFAULT_PYTHON, help="Python version for the venv")
    sp.add_argument("--extras", default=DEFAULT_EXTRAS, help="package extras to install")
    remote(sp)

    sp = target("run", "start training on every worker (one process per host, detached)")
    accel(sp)
    sp.add_argument("--config", required=True,
                    help="FILE.py:ARGS as for crate_jax.train, e.g. configs/clipa.py:variant=L/14")
    sp.add_argument("--workdir", required=True, help="checkpoint/log directory, gs://BUCKET/...")
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the training process (repeatable)")
    run_name(sp)
    remote(sp)
    sp.epilog = "Extra --config.KEY=VALUE arguments are passed to crate_jax.train unchanged."

    sp = target("tail", "print the training log of worker 0 (or --worker all)")
    sp.add_argument("--worker", default="0", help="worker index or 'all'")
    sp.add_argument("--lines", "-n", type=int, default=100, help="lines to show")
    sp.add_argument("--follow", "-f", action="store_true", help="keep following the log")
    run_name(sp)

    sp = target("status", "state of the queued resource, the node and the run on each worker")
    queued(sp)
    sp.add_argument("--no-workers", action="store_true", help="skip the ssh to the workers")
    run_name(sp)

    sp = target("stop", "stop the run: SIGTERM makes it checkpoint at the next step and exit")
    sp.add_argument("--kill", action="store_true", help="SIGKILL instead (no checkpoint)")
    sp.add_argument("--wait", type=int, default=0,
                    help="seconds to wait for the processes to exit (default: do not wait)")
    run_name(sp)

    sp = target("delete", "delete the node (with --queued: the queued resource and its node)")
    queued(sp)
    return p


_BUILDERS = {"create": build_create, "setup": build_setup, "run": build_run,
             "tail": build_tail, "status": build_status, "stop": build_stop,
             "delete": build_delete}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if args.command == "run" and _OVERRIDE_RE.match(a)]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + (" (only `run` passes --config.KEY=VALUE on to training)"
                        if any(a.startswith("--config.") for a in unknown) else ""))
    args.overrides = overrides
    try:
        if args.command == "plan":
            return print_plan(args)
        _check_target(args)
        commands = _BUILDERS[args.command](args)
        return execute(commands, args.dry_run, keep_going=args.command == "status")
    except LaunchError as e:
        print(f"tpu_vm.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
