"""Optional Weights & Biases logging: the metrics `MetricsWriter` writes, also sent to one W&B run.

`config.wandb = dict(project="crate", mode="online" | "offline" | "disabled", entity=, name=, group=, tags=)`
(checked by `validate.validate_wandb`). Only process 0 logs (it is the only one with an enabled writer).
The run id is kept in `WORKDIR/wandb_run_id`, so a restarted or resumed training continues the same W&B
run (`resume="allow"`) instead of starting a new one. W&B's own files go to `$WANDB_DIR` when it is set,
else into the workdir (local workdirs), else wandb's default (`./wandb`).

The x-axis is the training step, logged as the metric `step` (not W&B's internal `_step`): a resumed run
re-logs the steps after its checkpoint, which an internal step counter would refuse as going backwards.
"""

from __future__ import annotations

import json
import os
import secrets
import string

from crate_jax import errors

RUN_ID_FILE = "wandb_run_id"
_ID_CHARS = string.ascii_lowercase + string.digits


def run_id(workdir) -> str:
    """The W&B run id of `workdir` (an epath.Path): the stored one, or a new one, stored before the run starts
    so that a crash during start-up still resumes the same run."""
    path = workdir / RUN_ID_FILE
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = "".join(secrets.choice(_ID_CHARS) for _ in range(8))  # W&B's own id format
    path.write_text(new + "\n")
    return new


class WandbSink:
    """One W&B run for one workdir; `log(step, metrics)`, `flush()`, `close()`."""

    def __init__(self, workdir, section, run_config: dict | None = None):
        import wandb
        section = dict(section)
        kwargs = {k: section[k] for k in ("entity", "name", "group") if section.get(k) is not None}
        if section.get("tags"):
            kwargs["tags"] = list(section["tags"])
        wandb_dir = os.environ.get("WANDB_DIR") or (None if "://" in str(workdir) else str(workdir))
        self.run_id = run_id(workdir)
        try:
            # console="off": W&B would otherwise wrap sys.stdout, which the progress lines and the tests read.
            self.run = wandb.init(project=section["project"], mode=section.get("mode", "online"), id=self.run_id,
                                  resume="allow", dir=wandb_dir, config=_jsonable(run_config),
                                  settings=wandb.Settings(console="off"), **kwargs)
        except Exception as e:  # noqa: BLE001 - W&B's own errors (no API key, no network) become one usage line
            raise errors.UsageError(
                f"Weights & Biases could not start run {self.run_id} of project {section['project']!r}: "
                f"{type(e).__name__}: {e}. Log in (`wandb login`), or set --config.wandb.mode=offline (sync "
                f"later with `wandb sync`) or --config.wandb=None") from e
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({"step": int(step), **metrics})

    def flush(self) -> None:
        pass  # wandb sends in the background; finish() waits for it

    def close(self) -> None:
        self.run.finish()


def open_sink(workdir, section, run_config: dict | None = None) -> WandbSink | None:
    """A sink for `config.wandb` (`section`), or None when it is unset."""
    if section is None:
        return None
    return WandbSink(workdir, section, run_config)


def _jsonable(config) -> dict | None:
    """The run's config as plain JSON values (W&B shows it next to the run)."""
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))
