"""Scaling-curve sweeps: expand a grid of config points, train each one, collect the metrics, plot.

    python -m crate_jax.sweep --config configs/FILE.py:ARGS --grid variant=Ti/16,S/16,B/16,L/16 \\
        --grid patch=32,16,8 --workdir ROOT [--config.KEY=VALUE ...] [--tag NAME] \\
        [--launch-cmd TEMPLATE] [--dry-run] [--collect-only] [--summary-out PATH.png]

Grid: the cartesian product of the `--grid KEY=V1,V2,...` flags. A KEY without a dot is a config
argument, merged into `FILE.py:ARGS` (replacing the same key there); a dotted KEY (`optim.lr`) becomes
`--config.KEY=VALUE`. Every point is loaded once up front, so a bad key fails before anything runs.

Runs: each point trains in `ROOT[/TAG]/NAME` (NAME from its grid values, e.g. `variant_S_16--patch_8`)
through `python -m crate_jax.train` in a subprocess, one after another, its output in `train.log`
there. A run with `final_metrics.json` is skipped; a run with checkpoints resumes; a crash is recorded
and the sweep goes on. With `--launch-cmd`, each point is instead handed to a command template, e.g.
the Cloud TPU launcher (fields `{config}`, `{overrides}` (expands to the override arguments),
`{workdir}`, `{name}`, `{index}`):

    --launch-cmd "python launch/tpu_vm.py run crate-{index} --accelerator-type v5p-128 \\
        --config {config} --workdir gs://BUCKET/sweep/{name} --run-name {name} {overrides}"

Collect and plot (after the runs, or alone with `--collect-only`, e.g. over a copy of remote workdirs):
every run directory under ROOT with `metrics.jsonl` and `config.json` is read, and
`ROOT/plots/` gets PNGs with a CSV beside each: training loss vs step per size, final loss vs patch
size, final eval top-1 vs training FLOPs (`train_flops(model) × batch × steps`, plus the pre-training
run's FLOPs for a run initialised from another run of the sweep), and `scaling.png` with all three.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from crate_jax import errors

SIZE_ORDER = ("Ti", "T", "S", "M", "B", "L", "H", "g", "G", "e")
POINT_FILE = "sweep_point.json"


class SweepError(ValueError):
    """A bad grid, config or run directory; the message names it and says what was expected."""


# ----------------------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep.

    Attributes:
      name: run directory name, e.g. "variant_S_16--patch_8".
      config: the `--config` value, e.g. "configs/scaling.py:mode=digits,variant=S/16,patch=8".
      overrides: `--config.KEY=VALUE` arguments (the sweep-wide ones, then the point's).
      values: the grid values of this point, e.g. {"variant": "S/16", "patch": "8"}.
    """

    name: str
    config: str
    overrides: tuple[str, ...]
    values: dict

    def record(self) -> dict:
        return {"config": self.config, "overrides": list(self.overrides), "values": self.values}


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`['variant=Ti/16,S/16', 'patch=32,16']` -> `[('variant', ['Ti/16', 'S/16']), ('patch', ['32', '16'])]`."""
    out, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. variant=Ti/16,S/16 or optim.lr=1e-3,3e-4)")
        if key.startswith("config."):
            key = key[len("config."):]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise SweepError(f"--grid {item!r}: {key!r} is not a config argument or a dotted config key")
        if key in seen:
            raise SweepError(f"--grid: key {key!r} is given twice; put all its values in one --grid flag")
        seen.add(key)
        out.append((key, vals))
    return out


def merge_config_args(spec: str, args: dict) -> str:
    """`('configs/x.py:a=1,b=2', {'b': '3', 'c': '4'})` -> `'configs/x.py:a=1,b=3,c=4'`."""
    path, _, arg = spec.partition(":")
    merged: dict[str, str] = {}
    for part in filter(None, arg.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise SweepError(f"--config {spec!r}: argument {part!r} is not KEY=VALUE")
        merged[k] = v
    for k, v in args.items():
        if "," in str(v):
            raise SweepError(f"grid value {v!r} for config argument {k!r} contains ',', which separates arguments")
        merged[k] = str(v)
    return path + (":" + ",".join(f"{k}={v}" for k, v in merged.items()) if merged else "")


def _name_part(value: str) -> str:
    if value.startswith("gs://") or os.path.exists(value):  # paths are named by their last component
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.-]+", "_", value).strip("_")


def run_name(values: dict) -> str:
    """`{'variant': 'S/16', 'patch': '8'}` -> `'variant_S_16--patch_8'` (letters, digits, '_', '.', '-' only,
    as the TPU launcher's --run-name wants)."""
    return "--".join(f"{_name_part(k)}_{_name_part(str(v))}" for k, v in values.items()) or "base"


def expand(config: str, grid: list[tuple[str, list[str]]], overrides: list[str] = ()) -> list[Point]:
    """The cartesian product of `grid` applied to the `config` spec and sweep-wide `overrides`."""
    keys = [k for k, _ in grid]
    points = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        values = dict(zip(keys, combo))
        args = {k: v for k, v in values.items() if "." not in k}
        extra = [f"--config.{k}={v}" for k, v in values.items() if "." in k]
        points.append(Point(run_name(values), merge_config_args(config, args), tuple(overrides) + tuple(extra),
                            values))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError(f"grid points share run names {sorted({n for n in names if names.count(n) > 1})}; "
                         f"make the grid values distinct")
    return points


def load_config(spec: str, overrides=()):
    """The ConfigDict that `python -m crate_jax.train --config SPEC OVERRIDES` would train."""
    from crate_jax.train import config_cli
    return config_cli.load_with_overrides(spec, list(overrides))


def check_points(points: list[Point]) -> None:
    """Loads every point's config and builds its task (model config, data config; no devices, no data
    read beyond a class count), so a bad argument or key fails before the first run starts."""
    from crate_jax.train.setup import make_task
    for p in points:
        try:
            make_task(load_config(p.config, p.overrides))
        except ValueError as e:  # ConfigError: names the file or key
            raise SweepError(f"grid point {p.name}: --config {p.config} {' '.join(p.overrides)} does not load: "
                             f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------ run


def run_state(workdir: Path) -> str:
    """'done' (final_metrics.json written), 'partial' (started: checkpoints or metrics) or 'new'."""
    if (workdir / "final_metrics.json").is_file():
        return "done"
    if (workdir / "checkpoints").is_dir() or (workdir / "metrics.jsonl").is_file():
        return "partial"
    return "new"


def train_command(point: Point, workdir: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "crate_jax.train", "--config", point.config, "--workdir", str(workdir), *point.overrides]


def template_command(template: str, point: Point, workdir: str, index: int) -> list[str]:
    """Splits `template` into words, then fills `{config}`, `{workdir}`, `{name}`, `{index}` in each; the word
    `{overrides}` expands to the point's override arguments."""
    fields = {"config": point.config, "workdir": str(workdir), "name": point.name, "index": str(index)}
    out = []
    for word in shlex.split(template):
        if word == "{overrides}":
            out.extend(point.overrides)
            continue
        try:
            out.append(word.format(**fields))
        except (KeyError, IndexError, ValueError) as e:
            raise SweepError(f"--launch-cmd: cannot fill {word!r} ({e}); the fields are {{config}}, {{overrides}}, "
                             f"{{workdir}}, {{name}}, {{index}}") from e
    return out


def _check_owner(workdir: Path, point: Point) -> None:
    """A run directory made by another point is an error, not something to skip or resume."""
    f = workdir / POINT_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        if old != point.record():
            raise SweepError(f"{workdir} holds a run of another point ({old}); this point is {point.record()}. "
                             f"Use another --workdir or --tag")


def _claim(workdir: Path, point: Point) -> None:
    """Records the point in its run directory."""
    if not (workdir / POINT_FILE).is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / POINT_FILE).write_text(json.dumps(point.record(), indent=2) + "\n")


def run_sweep(points: list[Point], root: str, *, tag: str | None = None, launch_cmd: str | None = None,
              dry_run: bool = False, python: str = sys.executable, echo=print) -> dict[str, str]:
    """Runs (or launches, or with `dry_run` only prints) every point; returns {name: outcome}, the outcome
    being 'skipped (done)', 'ok', 'launched', 'dry-run' or 'failed (exit N)'."""
    base = f"{root.rstrip('/')}/{tag}" if tag else root.rstrip("/")
    local = not base.startswith("gs://")
    outcomes = {}
    if local:
        base = str(Path(base).absolute())  # the checkpointer wants absolute paths; the log shows where runs are
    for i, p in enumerate(points):
        workdir = f"{base}/{p.name}"
        if local:
            _check_owner(Path(workdir), p)
        state = run_state(Path(workdir)) if local else "new"
        cmd = template_command(launch_cmd, p, workdir, i) if launch_cmd else train_command(p, workdir, python)
        if state == "done":
            echo(f"[{i + 1}/{len(points)}] {p.name}: finished before, skipped ({workdir})")
            outcomes[p.name] = "skipped (done)"
            continue
        if dry_run:
            echo(shlex.join(cmd))
            outcomes[p.name] = "dry-run"
            continue
        if local:
            _claim(Path(workdir), p)
        verb = "resuming" if state == "partial" else ("launching" if launch_cmd else "training")
        echo(f"[{i + 1}/{len(points)}] {p.name}: {verb}: {shlex.join(cmd)}")
        if launch_cmd:
            rc = subprocess.run(cmd).returncode
        else:
            with open(Path(workdir) / "train.log", "a") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            where = "" if launch_cmd else f"; see {workdir}/train.log"
            echo(f"[{i + 1}/{len(points)}] {p.name}: FAILED with exit code {rc}{where}")
            outcomes[p.name] = f"failed (exit {rc})"
        else:
            outcomes[p.name] = "launched" if launch_cmd else "ok"
    return outcomes


# -------------------------------------------------------------------------------------- collect


@dataclasses.dataclass
class RunResult:
    """What the plots need from one finished (or partial) run directory."""

    name: str  # path relative to the sweep root
    workdir: Path
    variant: str  # e.g. "S/8"
    size: str  # e.g. "S"
    patch: int
    batch: int
    steps: int  # last logged training step
    flops_per_example: float  # train_flops(model) (3 x forward)
    losses: list[tuple[int, float]]  # (step, train/loss)
    eval_top1: float | None
    eval_loss: float | None
    init: str | None  # config.init.checkpoint
    parent: "RunResult | None" = None

    @property
    def own_flops(self) -> float:
        return self.flops_per_example * self.batch * self.steps

    @property
    def total_flops(self) -> float:
        """This run's training FLOPs plus those of the run it was initialised from (when in the sweep)."""
        return self.own_flops + (self.parent.total_flops if self.parent is not None else 0.0)

    @property
    def label(self) -> str:
        if self.parent is not None:
            return f"{self.parent.size}/{self.parent.patch}\u2192{self.patch}"
        return self.variant

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def _num_classes(config) -> int:
    n = config.get("model", {}).get("num_classes")
    if n is not None:
        return int(n)
    from crate_jax.data.images import loader
    return int(loader.num_classes(config.data))


def read_run(workdir: Path, root: Path) -> RunResult:
    """Reads `metrics.jsonl` and `config.json` (both written by crate_jax.train) from `workdir`."""
    from ml_collections import ConfigDict

    from crate_jax.models.flops import train_flops
    from crate_jax.classify.task import model_config_from
    from crate_jax.train.metrics import read_metrics

    cfg_file = workdir / "config.json"
    if not cfg_file.is_file():
        raise SweepError(f"{workdir}: metrics.jsonl without config.json; was it written by crate_jax.train?")
    config = ConfigDict(json.loads(cfg_file.read_text()))
    model = model_config_from(config, _num_classes(config))
    losses, top1, eval_loss = [], None, None
    for row in read_metrics(workdir / "metrics.jsonl"):  # one row per step, even across resumes
        if "train/loss" in row:
            losses.append((int(row["step"]), float(row["train/loss"])))
        for k in sorted(row):
            if re.fullmatch(r"eval/[^/]+/top1", k):
                top1 = float(row[k])
                eval_loss = row.get(k[:-len("top1")] + "loss", eval_loss)
                break
    losses.sort()
    init = config.get("init", {}).get("checkpoint") if "init" in config else None
    return RunResult(name=str(workdir.relative_to(root)), workdir=workdir, variant=model.variant,
                     size=model.variant.partition("/")[0], patch=model.patch_size, batch=int(config.batch_size),
                     steps=losses[-1][0] if losses else 0, flops_per_example=float(train_flops(model)),
                     losses=losses, eval_top1=top1, eval_loss=None if eval_loss is None else float(eval_loss),
                     init=init or None)


def collect(root: str | Path) -> list[RunResult]:
    """Every run under `root` (directories holding metrics.jsonl), with fine-tuning runs linked to the run
    they were initialised from when that run is also under `root`."""
    root = Path(root)
    runs = [read_run(f.parent, root) for f in sorted(root.rglob("metrics.jsonl"))]
    by_dir = {r.workdir.resolve(): r for r in runs}
    for r in runs:
        if r.init and not r.init.startswith("gs://"):
            target = Path(r.init).resolve()
            for cand in (target, *target.parents):  # a workdir, its checkpoints/ or checkpoints/<step>
                if cand in by_dir and by_dir[cand] is not r:
                    r.parent = by_dir[cand]
                    break
    return runs


# ----------------------------------------------------------------------------------------- plot


def _size_key(size: str):
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER), size)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _styles(runs):
    import matplotlib.pyplot as plt
    sizes = sorted({r.size for r in runs}, key=_size_key)
    patches = sorted({r.patch for r in runs}, reverse=True)
    colors = {s: plt.get_cmap("viridis")(i / max(1, len(sizes) - 1) * 0.9) for i, s in enumerate(sizes)}
    dashes = ["-", "--", ":", "-."]
    lines = {p: dashes[i % len(dashes)] for i, p in enumerate(patches)}
    markers = {p: "osD^v"[i % 5] for i, p in enumerate(patches)}
    return sizes, patches, colors, lines, markers


def _plot_loss_vs_step(ax, runs, styles):
    sizes, patches, colors, lines, _ = styles
    rows = []
    for r in sorted(runs, key=lambda r: (_size_key(r.size), -r.patch, r.parent is not None)):
        if not r.losses:
            continue
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, color=colors[r.size], linestyle=lines[r.patch],
                linewidth=2.2 if r.parent is not None else 1.4, label=r.label)
        rows += [[r.name, r.label, r.size, r.patch, s, v] for s, v in r.losses]
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_title("loss vs step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return ["run", "label", "size", "patch", "step", "train_loss"], rows


def _loss_key(runs):
    """Final eval loss when every pre-training run has one (over the whole eval set, less noisy), else the
    last logged training loss."""
    use_eval = all(r.eval_loss is not None for r in runs if r.parent is None)
    return ("final eval loss", lambda r: r.eval_loss) if use_eval else ("final training loss", lambda r: r.final_loss)


def _plot_loss_vs_patch(ax, runs, styles):
    sizes, patches, colors, _, _ = styles
    what, key = _loss_key(runs)
    rows = []
    for s in sizes:
        pts = sorted((r.patch, key(r)) for r in runs if r.size == s and r.parent is None and key(r) is not None)
        if pts:
            ax.plot([p for p, _ in pts], [v for _, v in pts], "o-", color=colors[s], label=s)
    for r in runs:
        if r.parent is not None and key(r) is not None:
            ax.plot([r.patch], [key(r)], "*", markersize=13, color=colors[r.size], label=r.label)
        rows.append([r.name, r.label, r.size, r.patch, r.final_loss, r.eval_loss])
    ax.set_xscale("log", base=2)
    ax.set_xticks(patches, [str(p) for p in patches])
    ax.invert_xaxis()  # smaller patches (more tokens) to the right
    ax.set_xlabel("patch size")
    ax.set_ylabel(what)
    ax.set_title("loss vs patch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ["run", "label", "size", "patch", "final_train_loss", "final_eval_loss"], rows


def _plot_acc_vs_flops(ax, runs, styles):
    sizes, patches, colors, lines, markers = styles
    rows = []
    for p in patches:
        pts = sorted((r.total_flops, 100 * r.eval_top1, r) for r in runs
                     if r.patch == p and r.parent is None and r.eval_top1 is not None)
        if not pts:
            continue
        ax.plot([f for f, _, _ in pts], [a for _, a, _ in pts], lines[p], color="0.6", linewidth=1, zorder=1)
        for f, a, r in pts:
            ax.scatter([f], [a], marker=markers[p], color=colors[r.size], zorder=2, s=36)
            ax.annotate(r.label, (f, a), textcoords="offset points", xytext=(4, -9), fontsize=7)
    for r in runs:
        if r.parent is not None and r.eval_top1 is not None:
            ax.scatter([r.total_flops], [100 * r.eval_top1], marker="*", s=160, color=colors[r.size], zorder=3,
                       edgecolors="k", linewidths=0.6)
            ax.annotate(r.label, (r.total_flops, 100 * r.eval_top1), textcoords="offset points", xytext=(5, 3),
                        fontsize=8, weight="bold")
    for r in runs:
        rows.append([r.name, r.label, r.size, r.patch, r.batch, r.steps, f"{r.flops_per_example:.6g}",
                     f"{r.own_flops:.6g}", f"{r.total_flops:.6g}", r.eval_top1, r.parent.name if r.parent else ""])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (analytic, incl. pre-training)")
    ax.set_ylabel("final eval top-1 (%)")
    ax.set_title("accuracy vs training compute")
    ax.grid(alpha=0.3, which="both")
    return ["run", "label", "size", "patch", "batch", "steps", "train_flops_per_example", "run_flops",
            "total_flops", "eval_top1", "initialised_from"], rows


PLOTS = (("loss_vs_step", _plot_loss_vs_step), ("loss_vs_patch", _plot_loss_vs_patch),
         ("accuracy_vs_flops", _plot_acc_vs_flops))


def plot(runs: list[RunResult], out_dir: str | Path, *, title: str = "") -> list[Path]:
    """Writes one PNG + CSV per plot and `scaling.png` / `scaling.csv` (all three; the per-run summary) into
    `out_dir`; returns the PNG paths."""
    if not runs:
        raise SweepError("no runs to plot: no metrics.jsonl under the sweep root")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = _styles(runs)
    written = []
    for name, fn in PLOTS:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        header, rows = fn(ax, runs, styles)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        _write_csv(out / f"{name}.csv", header, rows)
        written.append(out / f"{name}.png")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (_, fn) in zip(axes, PLOTS):
        header, rows = fn(ax, runs, styles)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)
    _write_csv(out / "scaling.csv", header, rows)  # the accuracy-vs-FLOPs table is the per-run summary
    written.append(out / "scaling.png")
    return written


# ----------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    from crate_jax.cli import tool_parser
    from crate_jax.train import config_cli
    p = tool_parser("crate_jax.sweep", __doc__, allow_abbrev=False)
    config_cli.add_config_arguments(p, required=False, help="configs/FILE.py:ARGS, the base of every point (required "
                                    "unless --collect-only); --config.KEY=VALUE overrides apply to every point")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one axis of the grid (repeatable): a config argument, or a dotted config key")
    p.add_argument("--workdir", required=True, help="sweep root: runs go to ROOT[/TAG]/NAME, plots to ROOT/plots")
    p.add_argument("--tag", help="subdirectory of ROOT for this grid (to keep several grids under one root)")
    p.add_argument("--launch-cmd", help="command template per point instead of a local run (see the module doc)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--collect-only", action="store_true", help="only collect ROOT's runs and plot")
    p.add_argument("--no-plot", action="store_true", help="run only")
    p.add_argument("--summary-out", help="also write the combined figure here (and its CSV beside it)")
    p.add_argument("--title", default="", help="title of the combined figure")
    p.add_argument("--python", default=sys.executable, help="interpreter for local runs")
    return p


def main(argv=None) -> int:
    from crate_jax.train import config_cli
    parser = _parser()
    args, overrides = config_cli.parse_args(parser, list(sys.argv[1:] if argv is None else argv))
    sweep_wide = [f"--config.{key}={value}" for key, value in overrides]
    try:
        if not args.collect_only:
            if not args.config:
                parser.error("--config is required (unless --collect-only)")
            points = expand(args.config, parse_grid(args.grid), sweep_wide)
            check_points(points)
            outcomes = run_sweep(points, args.workdir, tag=args.tag, launch_cmd=args.launch_cmd,
                                 dry_run=args.dry_run, python=args.python)
            failed = {k: v for k, v in outcomes.items() if v.startswith("failed")}
            print(f"sweep: {len(points)} points, " + ", ".join(
                f"{n} {o}" for o, n in sorted(_count(outcomes.values()).items())))
            if args.dry_run or args.no_plot or args.launch_cmd:
                return 1 if failed else 0
        else:
            failed = {}
        if args.workdir.startswith("gs://"):
            print("collect: copy the run directories here first (gsutil -m rsync -r ...), then --collect-only",
                  file=sys.stderr)
            return 1 if failed else 0
        runs = collect(args.workdir)
        written = plot(runs, Path(args.workdir) / "plots", title=args.title)
        if args.summary_out:
            import shutil
            dest = Path(args.summary_out)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(args.workdir) / "plots" / "scaling.png", dest)
            shutil.copyfile(Path(args.workdir) / "plots" / "scaling.csv", dest.with_suffix(".csv"))
            written.append(dest)
        for r in sorted(runs, key=lambda r: (_size_key(r.size), -r.patch)):
            top1 = "-" if r.eval_top1 is None else f"{100 * r.eval_top1:.1f}%"
            print(f"{r.name:40s} {r.label:10s} steps {r.steps:6d}  loss {r.final_loss or math.nan:.4f}  "
                  f"top1 {top1:>6s}  FLOPs {r.total_flops:.3e}")
        print("plots: " + ", ".join(map(str, written)))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


if __name__ == "__main__":
    errors.exit_with(main)
