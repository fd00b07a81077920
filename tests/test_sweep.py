"""crate_jax.sweep: grid expansion, run bookkeeping (skip / resume / crash), collecting metrics with
analytic FLOPs (fine-tuning runs add their pre-training run's FLOPs), the plots, and a real 2-point sweep
on the digits data through `python -m crate_jax.train` subprocesses."""

import csv
import json
import os
import shutil
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from crate_jax.configs import scaling  # noqa: E402
from crate_jax import sweep  # noqa: E402
from crate_jax.models.config import model_config  # noqa: E402


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # config paths are relative to the repository root, as on the command line


def test_scaling_config_real_and_digits_modes():
    from crate_jax.classify.task import model_config_from
    pre = scaling.get_config("variant=L/32")
    assert (pre.data.name, pre.model.num_classes, pre.batch_size, pre.optim.lr) == ("imagenet21k", 19_167, 4096, 8e-4)
    ft = scaling.get_config("variant=L/32,stage=finetune,patch=8,init=gs://b/in21k_l32")
    m = model_config_from(ft, ft.model.num_classes)
    assert (m.variant, m.patch_size, m.num_classes, m.num_patches) == ("L/8", 8, 1000, 784)
    assert (ft.init.checkpoint, ft.data.name, ft.loss.on_value, ft.data.randaug) == (
        "gs://b/in21k_l32", "imagenet2012", 0.9, (2, 9))
    d = scaling.get_config("mode=digits,variant=B,patch=8")
    m = model_config_from(d, 10)
    assert (m.width, m.depth, m.num_heads, m.patch_size, m.image_size) == (*scaling.DIGITS_SIZES["B"], 8, 16)
    with pytest.raises(ValueError, match="needs init=PATH"):
        scaling.get_config("stage=finetune")
    with pytest.raises(ValueError, match="expected one of"):
        scaling.get_config("mode=imagenet")


def test_grid_expands_to_the_cartesian_product_of_config_args_and_overrides():
    grid = sweep.parse_grid(["variant=Ti/16,S/16", "patch=8,16,2", "config.optim.lr=1e-3"])
    assert grid == [("variant", ["Ti/16", "S/16"]), ("patch", ["8", "16", "2"]), ("optim.lr", ["1e-3"])]
    points = sweep.expand("configs/scaling.py:mode=digits,patch=4", grid, ["--config.seed=3"])
    assert len(points) == 6
    p = points[1]
    assert p.name == "variant_Ti_16--patch_16--optim.lr_1e-3"
    assert p.config == "configs/scaling.py:mode=digits,patch=16,variant=Ti/16"  # patch=4 replaced
    assert p.overrides == ("--config.seed=3", "--config.optim.lr=1e-3")
    assert len({q.name for q in points}) == 6
    sweep.check_points(points)  # every point loads as a real config and builds its model config
    bad = sweep.expand("configs/scaling.py:mode=digits", sweep.parse_grid(["patch=32"]))  # 16 px digits
    with pytest.raises(sweep.SweepError, match="patch_32.*not divisible by patch size 32"):
        sweep.check_points(bad)


@pytest.mark.parametrize("items, msg", [
    (["variant"], "expected KEY=V1,V2"),
    (["variant="], "expected KEY=V1,V2"),
    (["patch=8", "patch=4"], "given twice"),
    (["bad key=1"], "not a config argument"),
])
def test_bad_grid_flags_say_what_is_expected(items, msg):
    with pytest.raises(sweep.SweepError, match=msg):
        sweep.parse_grid(items)


def test_a_point_that_does_not_load_fails_before_anything_runs():
    points = sweep.expand("configs/scaling.py:mode=digits", sweep.parse_grid(["variant=Ti,Q"]))
    with pytest.raises(sweep.SweepError, match=r"variant_Q.*sizes \['B', 'L', 'S', 'Ti'\]"):
        sweep.check_points(points)
    points = sweep.expand("configs/scaling.py:mode=digits", sweep.parse_grid(["model.widht=8"]))
    with pytest.raises(sweep.SweepError, match="config.model.widht"):
        sweep.check_points(points)


def test_launch_template_fills_fields_and_expands_overrides():
    p = sweep.Point("patch_8", "configs/scaling.py:patch=8", ("--config.seed=1", "--config.optim.lr=0.1"),
                    {"patch": "8"})
    cmd = sweep.template_command("python launch/tpu_vm.py run crate-{index} --config {config} "
                                 "--workdir {workdir} --run-name {name} {overrides}", p, "gs://b/s/patch_8", 3)
    assert cmd == ["python", "launch/tpu_vm.py", "run", "crate-3", "--config", "configs/scaling.py:patch=8",
                   "--workdir", "gs://b/s/patch_8", "--run-name", "patch_8", "--config.seed=1",
                   "--config.optim.lr=0.1"]
    with pytest.raises(sweep.SweepError, match="the fields are"):
        sweep.template_command("run {zone}", p, "w", 0)


def test_crashed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    points = sweep.expand("configs/scaling.py:mode=digits", sweep.parse_grid(["patch=8,4"]))
    lines = []
    out = sweep.run_sweep(points, str(tmp_path), python=shutil.which("false"), echo=lines.append)
    assert out == {"patch_8": "failed (exit 1)", "patch_4": "failed (exit 1)"}
    assert sum("FAILED" in x for x in lines) == 2 and (tmp_path / "patch_4" / "train.log").is_file()
    # A directory written by another point is refused rather than resumed.
    other = sweep.expand("configs/scaling.py:mode=digits,steps=7", sweep.parse_grid(["patch=8"]))
    with pytest.raises(sweep.SweepError, match="another point"):
        sweep.run_sweep(other, str(tmp_path), python=shutil.which("false"), echo=lines.append)
    (tmp_path / "patch_8" / "final_metrics.json").write_text("{}")  # ... even when that run has finished
    with pytest.raises(sweep.SweepError, match="another point"):
        sweep.run_sweep(other, str(tmp_path), python=shutil.which("false"), echo=lines.append)
    assert sweep.run_sweep(points[:1], str(tmp_path), python=shutil.which("false"), echo=lines.append) == {
        "patch_8": "skipped (done)"}


def _fake_run(root, name, arg, losses, top1, init=None):
    d = root / name
    d.mkdir(parents=True)
    c = scaling.get_config(arg + (f",stage=finetune,init={init}" if init else ""))
    (d / "config.json").write_text(c.to_json_best_effort())
    rows = [{"step": s, "train/loss": v} for s, v in losses]
    rows.append({"step": losses[-1][0], "eval/val/top1": top1, "eval/val/top5": 1.0, "eval/val/loss": losses[-1][1]})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, c


def test_collect_computes_flops_links_finetuning_and_plots(tmp_path):
    root = tmp_path / "sweep"
    pre, _ = _fake_run(root, "L8", "mode=digits,variant=L,patch=8,steps=40", [(20, 2.0), (40, 1.5)], 0.6)
    _fake_run(root, "S8", "mode=digits,variant=S,patch=8,steps=40", [(20, 2.1), (40, 1.7)], 0.5)
    _fake_run(root, "S4", "mode=digits,variant=S,patch=4,steps=40", [(20, 1.9), (40, 1.2)], 0.7)
    _fake_run(root, "recipe/L4", "mode=digits,variant=L,patch=4,steps=30", [(30, 1.0)], 0.9,
                         init=str(pre / "checkpoints" / "40"))
    runs = {r.name: r for r in sweep.collect(root)}
    assert set(runs) == {"L8", "S8", "S4", "recipe/L4"}

    def flops_per_example(patch):  # 3 x forward of the digits-L model, from the model table directly
        from crate_jax.models.flops import train_flops
        w, d, h = scaling.DIGITS_SIZES["L"]
        return train_flops(model_config("crate_alpha", f"L/{patch}", width=w, depth=d, num_heads=h,
                                        image_size=16, num_classes=10))

    l8, l4 = runs["L8"], runs["recipe/L4"]
    assert (l8.size, l8.patch, l8.steps, l8.batch) == ("L", 8, 40, 128)
    assert l8.own_flops == flops_per_example(8) * 128 * 40
    assert l4.parent is l8 and l4.label == "L/8\u21924"
    assert l4.total_flops == pytest.approx(flops_per_example(4) * 128 * 30 + l8.own_flops)
    assert runs["S4"].own_flops > runs["S8"].own_flops  # 4x the tokens
    assert (runs["S4"].final_loss, runs["S4"].eval_top1) == (1.2, 0.7)

    written = sweep.plot(list(runs.values()), tmp_path / "plots")
    assert [p.name for p in written] == ["loss_vs_step.png", "loss_vs_patch.png", "accuracy_vs_flops.png",
                                         "scaling.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.with_suffix(".csv").is_file()
    table = list(csv.DictReader(open(tmp_path / "plots" / "accuracy_vs_flops.csv")))
    row = {r["run"]: r for r in table}["recipe/L4"]
    assert row["initialised_from"] == "L8" and float(row["total_flops"]) == pytest.approx(l4.total_flops, rel=1e-5)
    steps = list(csv.DictReader(open(tmp_path / "plots" / "loss_vs_step.csv")))
    assert len(steps) == 7 and {r["label"] for r in steps} == {"L/8", "S/8", "S/4", "L/8\u21924"}


def test_run_state(tmp_path):
    assert sweep.run_state(tmp_path) == "new"
    (tmp_path / "metrics.jsonl").write_text("")
    assert sweep.run_state(tmp_path) == "partial"
    (tmp_path / "final_metrics.json").write_text("{}")
    assert sweep.run_state(tmp_path) == "done"


@pytest.mark.slow
def test_two_point_digits_sweep_trains_collects_plots_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per training subprocess: fastest to compile
    root = tmp_path / "sweep"
    argv = ["--config", "configs/scaling.py:mode=digits,variant=Ti,steps=10,batch=32", "--grid", "patch=8,4",
            "--workdir", str(root), "--summary-out", str(tmp_path / "docs" / "scaling.png"),
            "--python", sys.executable]
    assert sweep.main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "sweep: 2 points, 2 ok" in out
    for name in ("patch_8", "patch_4"):
        assert (root / name / "final_metrics.json").is_file()
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "docs" / "scaling.csv"))}
    assert set(rows) == {"patch_8", "patch_4"} and all(0 <= float(r["eval_top1"]) <= 1 for r in rows.values())
    assert float(rows["patch_4"]["run_flops"]) > float(rows["patch_8"]["run_flops"]) > 0
    assert (tmp_path / "docs" / "scaling.png").is_file() and (root / "plots" / "loss_vs_patch.png").is_file()
    assert sweep.main(argv) == 0
    assert "sweep: 2 points, 2 skipped (done)" in capsys.readouterr().out
