"""Where metrics go: `metrics.jsonl`, TensorBoard event files (no TensorFlow needed), the console and,
when `config.wandb` is set, Weights & Biases (`wandb_log`).
Only process 0 writes.

Every logged step is one line of `metrics.jsonl`: what is written for the step just written (its
evaluation after its train metrics) is merged into that step's line, which is rewritten in place. A
resumed run re-runs the steps after its checkpoint, so on resume the writer first drops the rows of
steps after the resumed one: every step appears once, as the run that produced the checkpointed state
logged it (one run per workdir: `crate_jax.train.workdir`). `read_metrics` (what `sweep` and the plots
use) also merges rows per step and key, for files written before these rules.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import jax


def _rows(text: str, source) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a crash: skip it, say so
            print(f"warning: {source} line {n} is not JSON (a write cut off by a crash?); skipped", file=sys.stderr)
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a `metrics.jsonl`, one per step (later rows of a step override earlier ones key by
    key), sorted by step."""
    from etils import epath
    path = epath.Path(str(path))
    merged: dict[int, dict] = {}
    for row in _rows(path.read_text(), path):
        if "step" in row:
            merged.setdefault(int(row["step"]), {}).update(row)
    return [merged[s] for s in sorted(merged)]


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool | None = None, resume_step: int | None = None,
                 wandb=None, run_config=None):
        """`wandb`: the `config.wandb` section (None: no W&B run); `run_config`: the config W&B shows."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        from etils import epath
        self.workdir = epath.Path(str(workdir))
        self.remote = "://" in str(workdir)
        self._jsonl = None
        self._lines: list[str] = []  # remote workdirs (gs://) cannot append: the file is rewritten
        self._last: tuple[int, dict, int] | None = None  # (step, row, byte offset of its line) of the last write
        self._tb = None
        if self.enabled:
            path = self.workdir / "metrics.jsonl"
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if resume_step is not None:  # the steps after the checkpoint are about to be re-run
                kept = [ln for ln in lines if ln.strip() and _step_of(ln) is not None and _step_of(ln) <= resume_step]
                if kept != lines:
                    path.write_text("".join(kept))
                lines = kept
            if self.remote:
                self._lines = lines
            else:
                self._jsonl = open(path, "ab", buffering=0)
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
                (self.workdir / "tensorboard").mkdir(exist_ok=True)
                self._tb = EventFileWriter(str(self.workdir / "tensorboard"))
            except Exception:  # noqa: BLE001 - no tensorboard, or a filesystem it cannot write to
                self._tb = None
        self._wandb = None
        if self.enabled and wandb is not None:
            from crate_jax.train import wandb_log
            self._wandb = wandb_log.open_sink(self.workdir, wandb, run_config)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        same = self._last is not None and self._last[0] == int(step)
        row = {**self._last[1], **clean} if same else {"step": int(step), **clean}
        line = json.dumps(row) + "\n"
        if self._jsonl is not None:
            if same:  # the step's line is the file's last: replace it by the merged one
                offset = self._last[2]
                self._jsonl.truncate(offset)
            else:
                offset = self._jsonl.seek(0, os.SEEK_END)
            self._jsonl.write(line.encode())
        else:
            if same:
                self._lines[-1] = line
            else:
                self._lines.append(line)
            offset = 0
            (self.workdir / "metrics.jsonl").write_text("".join(self._lines))
        self._last = (int(step), row, offset)
        if self._tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            values = [Summary.Value(tag=k, simple_value=v) for k, v in clean.items() if math.isfinite(v)]
            self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        if self._wandb is not None:
            self._wandb.log(step, clean)

    def flush(self):
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def console(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True, file=sys.stdout)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, m: dict, eta_s: float) -> str:
    mfu = m.get("perf/mfu", float("nan"))
    rate = (f"{m['perf/tokens_per_s']:,.0f} tok/s" if "perf/tokens_per_s" in m else
            f"{m.get('perf/examples_per_s', float('nan')):,.1f} ex/s")
    return (f"step {step:>6}/{total} | loss {m.get('train/loss', float('nan')):.4f} | "
            f"lr {m.get('train/lr', float('nan')):.3g} | {rate} | MFU {100 * mfu:.1f}% | ETA {format_eta(eta_s)}")


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of an n×n matmul in `dtype` on device 0, measured now (the MFU denominator per device)."""
    import jax.numpy as jnp
    x = jax.device_put(jnp.ones((n, n), dtype), jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
