"""crate_jax.aot: TPU slice names -> libtpu topologies, the per-device memory / FLOPs report of the real
train step compiled without data, on a simulated CPU mesh (always) and for a TPU topology (with libtpu)."""

import dataclasses
import importlib.util
import math
import os
import sys

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # launch/ is not an installed package

from train_helpers import tiny_config  # noqa: E402

from crate_jax import aot  # noqa: E402
from crate_jax.parallel.mesh import make_mesh  # noqa: E402
from crate_jax.train.setup import Setup  # noqa: E402


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # config paths are relative to the repository root, as on the command line


@pytest.mark.parametrize("name, topology, chips, hbm_gib, accel", [
    ("v5p-128", "v5p:4x4x4", 64, 95, "v5p-128"),
    ("v5p-8", "v5p:2x2x1", 4, 95, "v5p-8"),
    ("v5p-256", "v5p:4x4x8", 128, 95, "v5p-256"),
    ("v4-32", "v4:2x2x4", 16, 32, "v4-32"),
    ("v4-64", "v4:2x4x4", 32, 32, "v4-64"),
    ("v5e-16", "v5e:4x4", 16, 16, "v5litepod-16"),
    ("v5litepod-16", "v5e:4x4", 16, 16, "v5litepod-16"),
    ("v5e-8", "v5e:2x4", 8, 16, "v5litepod-8"),
    ("v6e-64", "v6e:8x8", 64, 32, "v6e-64"),
    ("v6e-256", "v6e:16x16", 256, 32, "v6e-256"),
    ("V5P:4x4x8", "v5p:4x4x8", 128, 95, "v5p-256"),
    ("v5p-24", "v5p:2x2x3", 12, 95, "v5p-24"),  # any multiple of 8 TensorCores, not only powers of two
    ("v5p-12288", "v5p:16x16x24", 6144, 95, "v5p-12288"),  # the largest published v5p slice
])
def test_slice_names_map_to_libtpu_topologies(name, topology, chips, hbm_gib, accel):
    t = aot.parse_topology(name)
    assert (t.topology, t.chips, t.hbm_bytes, t.accelerator_type) == (topology, chips, hbm_gib * 2**30, accel)


@pytest.mark.parametrize("bad", ["v5p-12", "v5p-100", "v4-4", "v3-8", "v6e-12", "tpu-64", "v5p:4x4", "v5e:2x2x2", ""])
def test_bad_topology_names_list_the_valid_forms(bad):
    with pytest.raises(aot.SliceError, match=r"v5p:4x4x4.*v5e:4x4|valid forms") as e:
        aot.parse_topology(bad)
    assert "v5p-128" in str(e.value) and "v6e-64" in str(e.value)


def test_cli_rejects_a_bad_topology_before_compiling(capsys):
    """Usage errors are argparse's: exit 2, the usage and one `error:` line naming the option."""
    for argv, says in ((["--topology", "v9-8"], "unknown TPU slice 'v9-8'"),
                       (["--topology", "v9-8"], "v5litepod-N"),  # the valid forms are listed
                       ([], "required: --topology"),
                       (["--topology", "v5e-4", "--sim"], "unrecognized arguments: --sim")):
        with pytest.raises(SystemExit) as e:
            aot.main(["--config", "tests/tiny_digits.py", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
        assert [ln for ln in err.splitlines() if "error:" in ln] == [err.splitlines()[-1]]


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'crate_jax[aot]')")


def test_simulated_report_is_the_sharded_state_and_needs_no_data():
    """FSDP mesh on 4 simulated devices; data source that does not exist; no total_steps (epochs instead).
    The compiled per-device argument bytes must equal the sharded state + batch shard exactly."""
    c = tiny_config()
    c.mesh.update(data=2, fsdp=2, tensor=1)
    c.data.update(source="tfds", name="no_such_dataset_anywhere")
    c.model.num_classes = 10
    del c["total_steps"]
    c.num_epochs = 90

    report = aot.aot_report(c, "v5e-4", simulate=True)
    assert report.estimate and "CPU-compiled estimate" in report.text()
    assert (report.devices, report.mesh) == (4, {"data": 2, "fsdp": 2, "tensor": 1})

    offline = aot.offline_config(c)
    assert offline.total_steps == 1 and "total_steps" not in c  # the caller's config is untouched
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    setup = Setup(offline, mesh)  # reads no data: num_classes and total_steps are set
    expected = _shard_bytes(setup.abstract_state) + _shard_bytes(setup.batch_shapes)
    assert report.arguments == expected
    replicated = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state["params"]))
    assert report.arguments < 3 * replicated  # params + two Adam moments, sharded over fsdp=2
    assert report.aliased > 0.9 * _shard_bytes(setup.abstract_state)  # the donated state is reused
    # XLA counts one device's share; the analytic count (3 x forward matmuls) is for the whole batch.
    assert report.flops_per_device == pytest.approx(report.analytic_flops / 4, rel=0.3)
    assert report.fits and not dataclasses.replace(report, hbm_bytes=report.total - 1).fits
    assert "DOES NOT FIT" in dataclasses.replace(report, hbm_bytes=1).text()
    assert dataclasses.replace(report, hbm_bytes=int(report.total / 0.95)).verdict.startswith("fits (tight")


def test_data_access_failure_says_how_to_avoid_it():
    c = tiny_config()
    c.data.source = "folder"  # no data_dir: any read of the data fails
    from crate_jax.errors import UsageError
    with pytest.raises(UsageError, match="--num-classes N"):  # a usage error (exit 2), not a bug
        aot.aot_report(c, "v5e-4", simulate=True)


def test_cli_simulate_prints_the_report(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # main() rewrites it
    rc = aot.main(["--config", "tests/tiny_digits.py", "--config.batch_size=16", "--config.model.depth=1",
                   "--config.microbatches=2", "--config.data.source=folder", "--num-classes", "10",
                   "--topology", "v4-8", "--simulate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "v4-8 (v4:2x2x1): 4 chips, mesh {'data': 4, 'fsdp': 1, 'tensor': 1}, global batch 16" in out
    assert "of 32.00 GiB HBM" in out and ": fits" in out and "CPU-compiled estimate" in out
    assert "undercount: XLA counts a loop body once, and this step loops (microbatches=2)" in out


@needs_libtpu
def test_tpu_topology_compile_reports_memory_and_flops():
    c = tiny_config()
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    report = aot.aot_report(c, "v5e-4")
    assert not report.estimate and "TPU v5e v5e:2x2 (libtpu" in report.backend
    assert (report.devices, report.mesh["data"]) == (4, 4)
    assert report.hbm_bytes == 16 * 2**30 and report.fits
    assert report.arguments > 0 and report.temporaries > 0
    assert report.flops_per_device == pytest.approx(report.analytic_flops / 4, rel=0.3)


@needs_libtpu
def test_tpu_out_of_memory_is_a_does_not_fit_report():
    """A batch whose activations cannot fit one v5e chip (16 GiB): the TPU compiler refuses the program."""
    c = tiny_config(batch_size=2**20)
    c.model.depth = 1
    report = aot.aot_report(c, "v5e-1")
    assert not report.fits and "RESOURCE_EXHAUSTED" in report.compiler_error
    assert report.temporaries > 16 * 2**30 * 0.9
    assert report.arguments > 2**20 * 16 * 16 * 3  # the uint8 image batch alone
    text = report.text()
    assert "DOES NOT FIT" in text and "config.mesh.fsdp" in text


@pytest.mark.parametrize("name", ["v5p-24", "v5p-96", "v4-24", "v5p-128", "v5e-16", "v6e-64", "v5p-100", "v5p-12",
                                  "v4-8192", "v7-8"])
def test_launcher_and_aot_accept_the_same_slice_names(name):
    """One parser: a name the launcher plans for is a name AOT compiles for, and vice versa."""
    from launch import tpu_vm
    from crate_jax.parallel import tpu_slices

    def launcher():
        return tpu_vm._slice(type("Args", (), {"accelerator_type": name})())

    try:
        spec = launcher()
    except tpu_vm.LaunchError:
        with pytest.raises(aot.SliceError):
            aot.parse_topology(name)
        return
    target = aot.parse_topology(name)
    assert (target.chips, target.hosts, target.topology) == (spec.chips, spec.hosts, spec.topology)
    assert target.chips * (2 if target.counts_cores else 1) == int(name.split("-")[1])
    assert target.hosts == tpu_slices.hosts_for(name)

