"""Tests for launch/: the Cloud TPU VM CLI (dry-run commands, validation, nothing executed in
dry-run), the shell scripts it runs on the workers (run/stop/status/setup in a temporary $HOME
under dash), and the SLURM / local GPU launch scripts."""

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO_ROOT, "launch")
TPU_VM = os.path.join(LAUNCH, "tpu_vm.py")
sys.path.insert(0, REPO_ROOT)

from crate_jax.parallel import tpu_slices  # noqa: E402
from launch import remote_scripts, tpu_vm  # noqa: E402

ZONE, PROJECT, NAME = "us-east5-a", "my-proj", "clipa-l14"
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
CLIPA = ("configs/clipa.py:variant=L/14,stage=pretrain,res=84,txt_len=32,"
         "shards=gs://my-bucket/datacomp/{00000..12799}.tar,vocab=gs://my-bucket/vocab.txt")
WORKDIR = "gs://my-bucket/runs/clipa_l14_pretrain"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _clean_env(path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    env["PATH"] = path
    return env


def cli(*args: str, path: str | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    """Runs launch/tpu_vm.py in a subprocess; by default with a PATH that holds no gcloud."""
    if path is None:
        empty = tmp_path / "empty_bin"
        empty.mkdir(exist_ok=True)
        path = str(empty)
    return subprocess.run([sys.executable, TPU_VM, *args], capture_output=True, text=True,
                          env=_clean_env(path), cwd=str(tmp_path) if tmp_path else None)


def main_inproc(monkeypatch, capsys, *args: str):
    """Runs tpu_vm.main in-process (fast); returns (exit code, stdout, stderr)."""
    for k in ("CLOUDSDK_COMPUTE_ZONE", "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    try:
        code = tpu_vm.main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- slices


@pytest.mark.parametrize("name, canonical, chips, hosts, runtime", [
    ("v5p-128", "v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-4096", "v4-4096", 2048, 512, "tpu-ubuntu2204-base"),
    ("v5e-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v6e-64", "v6e-64", 64, 16, "v2-alpha-tpuv6e"),
    ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("V6E-1", "v6e-1", 1, 1, "v2-alpha-tpuv6e"),
])
def test_slice_chips_hosts_runtime(name, canonical, chips, hosts, runtime):
    spec = tpu_slices.parse(name)
    assert (spec.accelerator_type, spec.chips, spec.hosts, spec.runtime_version) == (
        canonical, chips, hosts, runtime)
    assert spec.chips_per_host * spec.hosts == chips
    assert spec.multi_host == (hosts > 1)
    assert tpu_slices.hosts_for(name) == hosts


@pytest.mark.parametrize("name", ["v5p-100", "v4-4", "v4-8192", "v7-8", "v6e-12",
                                  "v5litepod-512", "tpu", "v3-8", "v5p-0", "v5p-"])
def test_unknown_accelerator_types_are_refused(name):
    with pytest.raises(tpu_slices.SliceError, match="unknown TPU slice"):
        tpu_slices.parse(name)


def test_plan_prints_hosts(monkeypatch, capsys):
    code, out, _ = main_inproc(monkeypatch, capsys, "plan", "--accelerator-type", "v5p-128")
    assert code == 0
    assert "v5p-128: 64 chips on 16 hosts (4 chips/host), runtime v2-alpha-tpuv5" in out
    assert "tensor cores: 128" in out


# ----------------------------------------------------------------------------- dry-run commands


def test_create_v5p_128_spot_dry_run_without_gcloud(tmp_path):
    r = cli("create", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type",
            "v5p-128", "--spot", "--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create clipa-l14 --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot"]
    assert "64 chips on 16 hosts" in r.stderr


def test_create_v4_32_queued_spot(monkeypatch, capsys):
    code, out, err = main_inproc(
        monkeypatch, capsys, "create", "pod4", "--zone", "us-central2-b", "--project", PROJECT,
        "--accelerator-type", "v4-32", "--queued", "--spot", "--valid-until-duration", "6h",
        "--dry-run")
    assert code == 0, err
    assert out.splitlines() == [
        "gcloud compute tpus queued-resources create pod4-qr --zone=us-central2-b "
        "--project=my-proj --node-id=pod4 --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --spot --valid-until-duration=6h"]
    assert "16 chips on 4 hosts" in err and "warning" not in err


@pytest.mark.parametrize("accel, zone, expected", [
    ("v5e-256", "us-west4-a", "--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite"),
    ("v6e-64", "us-east5-b", "--accelerator-type=v6e-64 --version=v2-alpha-tpuv6e"),
])
def test_create_on_demand_runtime_per_generation(monkeypatch, capsys, accel, zone, expected):
    code, out, err = main_inproc(monkeypatch, capsys, "create", "n1", "--zone", zone,
                                 "--project", PROJECT, "--accelerator-type", accel, "--dry-run")
    assert code == 0, err
    assert out == (f"gcloud compute tpus tpu-vm create n1 --zone={zone} --project=my-proj "
                   f"{expected}\n")


def test_create_in_unlisted_zone_warns_but_prints(monkeypatch, capsys):
    code, out, err = main_inproc(monkeypatch, capsys, "create", "n1", "--zone", "us-east5-a",
                                 "--project", PROJECT, "--accelerator-type", "v4-8", "--dry-run")
    assert code == 0 and out.startswith("gcloud compute tpus tpu-vm create n1 ")
    assert "warning: zone us-east5-a is not one of the zones listed for v4 (us-central2-b)" in err


def test_run_v5p_128_command(tmp_path):
    r = cli("run", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v5p-128",
            "--config", CLIPA, "--workdir", WORKDIR, "--env", "JAX_COMPILATION_CACHE_DIR="
            "gs://my-bucket/jax_cache", "--config.total_steps=100", "--config.lr=1e-3",
            "--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    argv = shlex.split(line)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *WHERE,
                        "--worker=all"]
    assert len(argv) == 10 and argv[9].startswith("--command=")
    script = argv[9][len("--command="):]
    train = shlex.join(["-m", "crate_jax.train", "--config", CLIPA, "--workdir", WORKDIR,
                        "--config.total_steps=100", "--config.lr=1e-3"])
    assert (f"setsid nohup env PYTHONUNBUFFERED=1 CRATE_JAX_DISTRIBUTED=1 "
            f"JAX_COMPILATION_CACHE_DIR=gs://my-bucket/jax_cache "
            f'"$HOME"/crate_jax_venv/bin/python {train} '
            f'>> "$HOME"/crate_jax_runs/train.log 2>&1 < /dev/null &') in script
    assert "cd crate_jax;" in script
    # The brace range must reach the worker quoted, not expanded by its shell.
    assert "'configs/clipa.py:variant=L/14" in script
    assert "16 processes started with --worker=all" in r.stderr


def test_setup_clone_at_pinned_commit(monkeypatch, capsys):
    url = "https://github.com/example/crate_jax.git"
    code, out, err = main_inproc(monkeypatch, capsys, "setup", NAME, "--zone", ZONE,
                                 "--project", PROJECT, "--commit", SHA, "--repo-url", url,
                                 "--dry-run")
    assert code == 0, err
    (line,) = out.splitlines()
    argv = shlex.split(line)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *WHERE,
                        "--worker=all"]
    script = argv[9][len("--command="):]
    assert f"git clone --quiet {url} crate_jax" in script
    assert f"git -C crate_jax checkout --quiet --detach {SHA}" in script
    assert ('"$UV" pip install --quiet --python crate_jax_venv/bin/python '
            "-e './crate_jax[tpu,gcs]' 'jax[tpu]==0.10.2'") in script
    assert '"$UV" venv --quiet --python 3.12 crate_jax_venv' in script


def test_setup_archive_mode_copies_this_checkout(monkeypatch, capsys):
    code, out, err = main_inproc(monkeypatch, capsys, "setup", NAME, "--zone", ZONE,
                                 "--project", PROJECT, "--commit", SHA[:12],
                                 "--jax-version", "0.10.1", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    archive = f"crate_jax-{SHA[:12]}.tar.gz"
    local = shlex.split(lines[0])[-2].split("=", 1)[1]
    assert os.path.basename(local) == archive
    assert shlex.split(lines[0]) == ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
                                     "--prefix=crate_jax/", f"--output={local}", SHA[:12]]
    assert shlex.split(lines[1]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", local,
                                     f"{NAME}:{archive}", *WHERE, "--worker=all"]
    script = shlex.split(lines[2])[9]
    assert f"tar -xzf {archive} -C crate_jax --strip-components=1" in script
    assert "'jax[tpu]==0.10.1'" in script


def test_tail_status_stop_delete_commands(monkeypatch, capsys):
    def dry(*args):
        code, out, err = main_inproc(monkeypatch, capsys, *args, NAME, "--zone", ZONE,
                                     "--project", PROJECT, "--dry-run")
        assert code == 0, err
        return [shlex.split(line) for line in out.splitlines()]

    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *WHERE]
    (tail0,) = dry("tail")
    assert tail0 == [*ssh, "--worker=0",
                     '--command=cd "$HOME"; tail -n 100 crate_jax_runs/train.log']
    (tail_all,) = dry("tail", "--worker", "all", "-f", "-n", "20", "--run-name", "ft")
    assert tail_all == [*ssh, "--worker=all",
                        '--command=cd "$HOME"; tail -n 20 -F crate_jax_runs/ft.log | '
                        'sed -u "s/^/[$(hostname)] /"']
    qr, node, workers = dry("status", "--queued")
    assert qr == ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{NAME}-qr",
                  *WHERE]
    assert node[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME, *WHERE]
    assert workers[:9] == [*ssh, "--worker=all"]
    (stop,) = dry("stop", "--wait", "600")
    assert stop[:9] == [*ssh, "--worker=all"]
    assert 'kill -TERM "$pid"' in stop[9] and '[ "$i" -lt 600 ]' in stop[9]
    (kill,) = dry("stop", "--kill")
    assert 'kill -KILL "$pid"' in kill[9]
    assert dry("delete") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, *WHERE,
                              "--quiet"]]
    assert dry("delete", "--queued", "--qr-name", "myqr") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "myqr", *WHERE, "--force",
         "--quiet"]]


def test_zone_and_project_from_gcloud_env(tmp_path):
    env = _clean_env(str(tmp_path))
    env.update(CLOUDSDK_COMPUTE_ZONE=ZONE, CLOUDSDK_CORE_PROJECT=PROJECT)
    r = subprocess.run([sys.executable, TPU_VM, "delete", NAME, "--dry-run"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"gcloud compute tpus tpu-vm delete {NAME} {' '.join(WHERE)} --quiet\n"


# ----------------------------------------------------------------------------- validation


RUN = ["run", NAME, "--zone", ZONE, "--project", PROJECT, "--config", CLIPA, "--dry-run"]


@pytest.mark.parametrize("args, message", [
    (["create", NAME, "--project", PROJECT, "--accelerator-type", "v5p-128"],
     "missing zone: pass --zone"),
    (["create", NAME, "--zone", ZONE, "--accelerator-type", "v5p-128"],
     "missing project: pass --project"),
    (["create", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v5p-100"],
     "--accelerator-type: unknown TPU slice 'v5p-100'"),
    (["create", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v9-8"],
     "unknown TPU slice 'v9-8'"),
    (["create", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v5p-8",
      "--spot", "--reserved"], "--spot and --reserved exclude each other"),
    (["create", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v5p-8",
      "--valid-until-duration", "6h"], "--valid-until-duration only applies to --queued"),
    (["create", "Bad_Name", "--zone", ZONE, "--project", PROJECT, "--accelerator-type",
      "v5p-8"], "TPU name 'Bad_Name' is invalid"),
    (["create", NAME, "--zone", "useast", "--project", PROJECT, "--accelerator-type", "v5p-8"],
     "--zone 'useast' is not a zone name"),
    ([*RUN, "--accelerator-type", "v5p-128", "--workdir", "/tmp/ckpt"],
     "--workdir '/tmp/ckpt' must be a gs://BUCKET/... path: v5p-128 has 16 hosts"),
    ([*RUN, "--accelerator-type", "v4-32", "--workdir", "runs/x"],
     "v4-32 has 4 hosts"),
    ([*RUN, "--accelerator-type", "v4-32", "--workdir", "gs://b"], "the bucket name must be"),
    ([*RUN, "--accelerator-type", "v4-32", "--workdir", WORKDIR, "--env", "1X=2"],
     "--env '1X=2' must be KEY=VALUE"),
    ([*RUN, "--accelerator-type", "v4-32", "--workdir", WORKDIR, "--run-name", "a b"],
     "--run-name 'a b' may only hold"),
    ([*RUN, "--accelerator-type", "v4-32", "--workdir", WORKDIR, "--remote-dir", "../x"],
     "--remote-dir '../x' must be a plain path"),
    (["run", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v4-32",
      "--config", "/abs/clipa.py:variant=B/16", "--workdir", WORKDIR],
     "must be FILE.py[:ARGS] with FILE relative to the repository root"),
    (["setup", NAME, "--zone", ZONE, "--project", PROJECT, "--commit", "main"],
     "--commit 'main' must be a commit hash"),
    (["setup", NAME, "--zone", ZONE, "--project", PROJECT, "--commit", SHA,
      "--jax-version", "latest"], "--jax-version 'latest' must be an exact version"),
    (["tail", NAME, "--zone", ZONE, "--project", PROJECT, "--worker", "first"],
     "--worker 'first' must be a worker index"),
])
def test_validation_errors(monkeypatch, capsys, args, message):
    code, out, err = main_inproc(monkeypatch, capsys, *args)
    assert code == 2
    assert out == ""  # nothing printed as a command
    assert message in err


def test_overrides_only_for_run_and_unknown_flags_refused(monkeypatch, capsys):
    code, _, err = main_inproc(monkeypatch, capsys, "delete", NAME, "--zone", ZONE, "--project",
                               PROJECT, "--config.lr=1", "--dry-run")
    assert code == 2 and "only `run` passes --config.KEY=VALUE" in err
    code, _, err = main_inproc(monkeypatch, capsys, *RUN, "--accelerator-type", "v4-32",
                               "--workdir", WORKDIR, "--lr=1")
    assert code == 2 and "unrecognized arguments: --lr=1" in err


def test_single_host_local_workdir_is_allowed_with_a_warning(monkeypatch, capsys):
    code, out, err = main_inproc(monkeypatch, capsys, *RUN, "--accelerator-type", "v6e-8",
                                 "--workdir", "runs/x")
    assert code == 0 and "--workdir runs/x --config" not in out
    assert "--workdir runs/x" in shlex.split(out)[9]
    assert "is on the TPU VM's disk" in err


# ----------------------------------------------------------------------------- execution


def _fake_gcloud(bin_dir, record):
    """A `gcloud` that appends its argv (one NUL-separated record per line) to `record`."""
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "gcloud"
    exe.write_text(f"#!{sys.executable}\nimport sys\n"
                   f"open({str(record)!r}, 'a').write('\\0'.join(sys.argv[1:]) + '\\n')\n")
    exe.chmod(0o755)


def test_dry_run_executes_nothing_and_real_run_executes_exactly_the_printed(tmp_path):
    record = tmp_path / "calls.txt"
    _fake_gcloud(tmp_path / "bin", record)
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    args = ["run", NAME, "--zone", ZONE, "--project", PROJECT, "--accelerator-type", "v4-32",
            "--config", CLIPA, "--workdir", WORKDIR, "--config.seed=3"]
    dry = cli(*args, "--dry-run", path=path, tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert not record.exists()  # dry-run called nothing
    real = cli(*args, path=path, tmp_path=tmp_path)
    assert real.returncode == 0, real.stderr
    calls = [["gcloud", *line.split("\0")] for line in record.read_text().splitlines()]
    assert [shlex.join(c) for c in calls] == dry.stdout.splitlines()
    assert real.stdout == ""  # the commands go to stderr as '+ cmd' when executed
    assert "+ gcloud compute tpus tpu-vm ssh" in real.stderr


def test_status_keeps_going_after_a_failure(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nimport sys\n"
                                    f"open({str(tmp_path / 'n')!r}, 'a').write('x')\n"
                                    "sys.exit(3)\n")
    (bin_dir / "gcloud").chmod(0o755)
    r = cli("status", NAME, "--zone", ZONE, "--project", PROJECT, "--queued",
            path=str(bin_dir), tmp_path=tmp_path)
    assert r.returncode == 3
    assert (tmp_path / "n").read_text() == "xxx"  # all three commands were tried
    r = cli("delete", NAME, "--zone", ZONE, "--project", PROJECT, path=str(bin_dir),
            tmp_path=tmp_path)
    assert r.returncode == 3 and "command failed with exit code 3" in r.stderr


def test_real_run_without_gcloud_says_how_to_fix(tmp_path):
    r = cli("delete", NAME, "--zone", ZONE, "--project", PROJECT, tmp_path=tmp_path)
    assert r.returncode == 2
    assert "'gcloud' was not found on PATH" in r.stderr and "--dry-run" in r.stderr


# ----------------------------------------------------------------------------- worker scripts


def _sh(script: str, home, path: str | None = None, timeout: float = 20):
    """Runs a worker script the way `gcloud ... ssh --command` does on a TPU VM: in the login
    shell, bash on the Ubuntu images (so an unquoted {a..b} range would be expanded here too)."""
    env = {"HOME": str(home), "PATH": path or os.environ["PATH"], "LC_ALL": "C"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _has(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK)
               for d in os.environ["PATH"].split(os.pathsep))


def _write_exe(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _wait_for(path, timeout=10.0):
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def _fake_training_process() -> subprocess.Popen:
    """A live process whose command line names crate_jax.train, as a real run's does."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "-m", "crate_jax.train"])


def test_worker_stale_pid_file_does_not_block_run_or_show_as_running(tmp_path):
    (tmp_path / "crate_jax_runs").mkdir()
    stale = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "crate_jax_runs" / "train.pid").write_text(f"{stale.pid}\n")
        r = _sh(remote_scripts.status_script(run_name="train"), tmp_path)
        assert "train not running" in r.stdout
        r = _sh(remote_scripts.stop_script(run_name="train"), tmp_path)
        assert "train is not running" in r.stdout
        stale.poll()
        assert stale.returncode is None  # stop did not signal the unrelated process
        r = _sh(remote_scripts.run_script(run_name="train", remote_dir="crate_jax",
                                          venv="crate_jax_venv", train_argv=["-m", "x"],
                                          env={}), tmp_path)
        assert "is missing; run the setup subcommand first" in r.stderr  # past the pid check
    finally:
        stale.kill()
        stale.wait()


def test_worker_run_status_stop_lifecycle(tmp_path):
    home = tmp_path / "home"
    (home / "crate_jax").mkdir(parents=True)
    (home / "crate_jax_runs").mkdir()
    (home / "crate_jax_runs" / "installed_commit").write_text(SHA + "\n")
    # Stands in for the venv's python: logs its argv, cwd and env, saves on SIGTERM.
    _write_exe(home / "crate_jax_venv" / "bin" / "python", """#!/bin/sh
echo "argv: $*"
echo "cwd: $(pwd)"
echo "cache: $JAX_COMPILATION_CACHE_DIR unbuffered: $PYTHONUNBUFFERED"
trap 'echo "got SIGTERM, saving checkpoint"; exit 0' TERM
touch "$HOME/started"
while :; do sleep 0.05; done
""")
    train = ["-m", "crate_jax.train", "--config", CLIPA, "--workdir", WORKDIR, "--config.x=1"]
    run = remote_scripts.run_script(
        run_name="train", remote_dir="crate_jax", venv="crate_jax_venv", train_argv=train,
        env={"PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": "gs://b/cache dir"})
    pid_file = home / "crate_jax_runs" / "train.pid"
    try:
        r = _sh(run, home)
        assert r.returncode == 0, r.stderr
        assert "started train (pid" in r.stdout
        _wait_for(home / "started")
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # alive, detached from the finished shell

        again = _sh(run, home)
        assert again.returncode == 1
        assert f"run train is already running (pid {pid}); stop it first" in again.stderr

        status = _sh(remote_scripts.status_script(run_name="train"), home)
        assert f"train running (pid {pid}), commit {SHA}" in status.stdout

        stop = _sh(remote_scripts.stop_script(run_name="train", wait_s=10), home)
        assert stop.returncode == 0, stop.stderr
        assert f"sent SIGTERM to train (pid {pid})" in stop.stdout
        assert "train exited" in stop.stdout
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = (home / "crate_jax_runs" / "train.log").read_text().splitlines()
    assert log[0].startswith("=== ") and log[0].endswith(f"commit {SHA}")
    assert log[1] == "argv: " + " ".join(train)  # the brace range arrived unexpanded
    assert log[2] == f"cwd: {home / 'crate_jax'}"
    assert log[3] == "cache: gs://b/cache dir unbuffered: 1"
    assert log[4] == "got SIGTERM, saving checkpoint"
    status = _sh(remote_scripts.status_script(run_name="train"), home)
    assert "train not running" in status.stdout
    assert "last log line: got SIGTERM, saving checkpoint" in status.stdout
    stop = _sh(remote_scripts.stop_script(run_name="train"), home)
    assert "train is not running" in stop.stdout


def test_worker_run_without_setup_says_so(tmp_path):
    script = remote_scripts.run_script(run_name="train", remote_dir="crate_jax",
                                       venv="crate_jax_venv", train_argv=["-m", "x"], env={})
    r = _sh(script, tmp_path)
    assert r.returncode == 1
    assert "~/crate_jax_venv/bin/python is missing; run the setup subcommand first" in r.stderr


def test_worker_setup_from_archive(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # The archive `git archive --prefix=crate_jax/` would make.
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname='crate_jax'\n")
    (src / "configs" / "clipa.py").write_text("# config\n")
    archive = f"crate_jax-{SHA[:12]}.tar.gz"

    def copy_archive():  # what `gcloud ... scp` leaves in the worker's home
        with tarfile.open(home / archive, "w:gz") as tar:
            tar.add(src, arcname="crate_jax")

    copy_archive()
    (home / "crate_jax").mkdir()
    (home / "crate_jax" / "stale.py").write_text("old\n")  # replaced, not merged
    # Fakes for the system python3 (pip installs uv) and for uv (venv + pip install).
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "calls.txt"
    _write_exe(bin_dir / "python3", f"""#!/bin/sh
echo "python3 $*" >> {calls}
mkdir -p "$HOME/.local/bin"
cat > "$HOME/.local/bin/uv" <<'EOF'
#!/bin/sh
echo "uv $*" >> {calls}
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf '#!/bin/sh\\necho "venv-python $*" >> {calls}\\n' > "$last/bin/python"
  chmod +x "$last/bin/python"
fi
EOF
chmod +x "$HOME/.local/bin/uv"
""")
    script = remote_scripts.setup_script(
        commit=SHA[:12], remote_dir="crate_jax", venv="crate_jax_venv", python_version="3.12",
        jax_version="0.10.2", extras="tpu,gcs", archive=archive)
    r = _sh(script, home, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert (home / "crate_jax" / "configs" / "clipa.py").exists()
    assert not (home / "crate_jax" / "stale.py").exists()
    assert not (home / archive).exists()
    assert (home / "crate_jax_runs" / "installed_commit").read_text().strip() == SHA[:12]
    lines = calls.read_text().splitlines()
    assert lines[0] == "python3 -m pip install --user --quiet uv>=0.5"
    assert lines[1] == "uv venv --quiet --python 3.12 crate_jax_venv"
    assert lines[2] == ("uv pip install --quiet --python crate_jax_venv/bin/python "
                        "-e ./crate_jax[tpu,gcs] jax[tpu]==0.10.2")
    assert lines[3].startswith("venv-python -c import jax, crate_jax;")
    assert f"crate_jax {SHA[:12]} installed with jax 0.10.2" in r.stdout

    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    stale = subprocess.Popen(["sleep", "30"])  # a reused pid that is not a training process
    live = _fake_training_process()
    try:
        (home / "crate_jax_runs" / "old.pid").write_text(f"{stale.pid}\n")
        copy_archive()
        r = _sh(script, home, path=path)
        assert r.returncode == 0, r.stderr  # a stale pid file does not block
        # A live run blocks a re-install, and nothing is touched.
        (home / "crate_jax_runs" / "train.pid").write_text(f"{live.pid}\n")
        copy_archive()
        r = _sh(script, home, path=path)
        assert r.returncode == 1
        assert f"crate_jax_runs/train.pid (pid {live.pid}) is still running" in r.stderr
        assert (home / archive).exists()
    finally:
        for p in (stale, live):
            p.kill()
            p.wait()


@pytest.mark.parametrize("script", [
    remote_scripts.tail_script(run_name="t", lines=5, follow=True, label_hosts=True),
    remote_scripts.stop_script(run_name="t", signal="KILL", wait_s=3),
    remote_scripts.setup_script(commit=SHA, remote_dir="a/b", venv="v", python_version="3.12",
                                jax_version="0.10.2", extras="tpu", repo_url="git@x:y.git"),
])
def test_worker_scripts_are_valid_posix_sh(script):
    sh = "dash" if _has("dash") else "sh"
    r = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\n" not in script


# ----------------------------------------------------------------------------- GPU scripts


def _bash(script: str, *args: str, env: dict | None = None, timeout: float = 20):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(env or {})
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=REPO_ROOT)


GPU_CONFIG = "configs/clipa.py:variant=B/16,shards=/data/{00000..00099}.tar"


def test_gpu_local_dry_run(tmp_path):
    r = _bash("gpu_local.sh", GPU_CONFIG, str(tmp_path / "wd"), "--config.lr=0.1",
              env={"DRY_RUN": "1", "PYTHON": "/opt/py/bin/python"})
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "env", "-u", "SLURM_NTASKS", "-u", "SLURM_STEP_NODELIST", "-u", "SLURM_PROCID", "-u", "SLURM_LOCALID",
        "PYTHONUNBUFFERED=1", "/opt/py/bin/python", "-m", "crate_jax.train", "--config",
        GPU_CONFIG, "--workdir", str(tmp_path / "wd"), "--config.lr=0.1"]
    rel = _bash("gpu_local.sh", GPU_CONFIG, "runs/x", env={"DRY_RUN": "1", "PYTHON": "p"})
    assert f"--workdir {REPO_ROOT}/runs/x" in rel.stdout  # made absolute before the cd


def test_slurm_dry_run_per_gpu_and_per_node():
    r = _bash("slurm.sbatch", GPU_CONFIG, "/shared/runs/l14", "--config.seed=1",
              env={"DRY_RUN": "1", "PYTHON": "python3"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("srun --kill-on-bad-exit=1 env PYTHONUNBUFFERED=1 python3 -m "
                        f"crate_jax.train --config '{GPU_CONFIG}' --workdir /shared/runs/l14 "
                        "--config.seed=1\n")
    assert "one process per GPU" in r.stderr
    # Inside a one-task-per-node job jax would otherwise keep only GPU SLURM_LOCALID=0.
    r = _bash("slurm.sbatch", GPU_CONFIG, "gs://b/wd",
              env={"DRY_RUN": "1", "PYTHON": "python3", "SLURM_NTASKS_PER_NODE": "1",
                   "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "3"})
    assert r.returncode == 0, r.stderr
    assert "env PYTHONUNBUFFERED=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3 python3" in r.stdout
    assert "3 nodes x 1 tasks, one process per node, each on 4 GPUs" in r.stderr


@pytest.mark.parametrize("script", ["slurm.sbatch", "gpu_local.sh"])
@pytest.mark.parametrize("args, message", [
    ((), "CONFIG and WORKDIR are required"),
    (("configs/clipa.txt", "wd"), "must be FILE.py[:ARGS]"),
    (("/abs/clipa.py", "wd"), "relative to the repository root"),
    (("configs/clipa.py", "wd", "--lr=1"), "'--lr=1' is not of the form --config.KEY=VALUE"),
])
def test_gpu_scripts_validate(script, args, message):
    r = _bash(script, *args, env={"DRY_RUN": "1"})
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_slurm_refuses_mismatched_tasks_per_node():
    r = _bash("slurm.sbatch", "configs/clipa.py", "wd",
              env={"DRY_RUN": "1", "SLURM_NTASKS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"})
    assert r.returncode == 2 and "--ntasks-per-node=1" in r.stderr


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path):
    """USR1 (sent by --signal=B:USR1@300) -> SIGTERM to the training step -> scontrol requeue."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "log.txt"
    _write_exe(bin_dir / "srun", '#!/bin/sh\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit
    _write_exe(bin_dir / "scontrol", f'#!/bin/sh\necho "scontrol $*" >> {log}\n')
    _write_exe(bin_dir / "python", f"""#!/bin/sh
trap 'echo "train got SIGTERM" >> {log}; exit 0' TERM
echo "train $*" >> {log}
touch {tmp_path / 'started'}
while :; do sleep 0.05; done
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(bin_dir / "python"),
               SLURM_JOB_ID="4242", SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8")
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "configs/clipa.py",
                             "/shared/wd"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(tmp_path / "started")
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=20)
    finally:  # the job script and the stand-in training process share this process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == [
        "train -m crate_jax.train --config configs/clipa.py --workdir /shared/wd",
        "train got SIGTERM",
        "scontrol requeue 4242",
    ]
    assert "requeueing job 4242" in err
