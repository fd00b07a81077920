"""Weights & Biases logging (`config.wandb`), offline: a training run logs the metrics of `metrics.jsonl` to
one W&B run whose id is kept in the workdir, a resumed training logs to the same run id, and a bad
`config.wandb` is a config error before anything compiles."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from ml_collections import ConfigDict
from train_helpers import losses, tiny_config

from crate_jax.errors import ConfigError
from crate_jax.train import validate
from crate_jax.train.__main__ import main as train_main
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.wandb_log import RUN_ID_FILE


def _records(path: Path):
    """The protobuf records of a `.wandb` file (a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte
    header, after a 7-byte `:W&B` file header), as `wandb sync` reads them."""
    from wandb.proto import wandb_internal_pb2
    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header]) if left >= header else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _run_log(run_dir: Path) -> tuple[str, str, list[dict]]:
    """(run id, project, history rows) of one offline run directory."""
    run_id, project, rows = None, None, []
    for rec in _records(next(run_dir.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id, project = rec.run.run_id, rec.run.project
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return run_id, project, rows


def _config(total_steps: int):
    c = tiny_config(total_steps=total_steps, checkpoint_every=2)
    c.wandb = ConfigDict(dict(project="crate-jax-test", mode="offline", tags=["unit"]))
    return c


@pytest.mark.slow
def test_training_logs_to_wandb_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "wandb_dir").mkdir()
    wd = tmp_path / "wd"
    train_and_evaluate(_config(2), wd)
    run_id = (wd / RUN_ID_FILE).read_text().strip()
    first, = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    got_id, project, rows = _run_log(first)
    assert got_id == run_id and project == "crate-jax-test" and first.name.endswith(run_id)
    logged = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert logged == pytest.approx(losses(wd)) and sorted(logged) == [1, 2]  # the metrics.jsonl values
    assert all("train/lr" in row and "perf/steps_per_s" in row for row in rows if "train/loss" in row)

    train_and_evaluate(_config(3), wd)  # resumes from the step-2 checkpoint
    assert (wd / RUN_ID_FILE).read_text().strip() == run_id
    second, = set((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")) - {first}
    got_id, _, rows = _run_log(second)
    assert got_id == run_id
    assert [row["step"] for row in rows if "train/loss" in row] == [3]


@pytest.mark.parametrize("section, message", [
    ("p", "config.wandb: expected None or dict"),
    (dict(project="p", mode="sometimes"), "config.wandb.mode: got 'sometimes'"),
    (dict(mode="offline"), "config.wandb.project: expected the W&B project name"),
    (dict(project="p", colour="red"), "config.wandb: unknown keys ['colour']"),
    (dict(project="p", tags="a,b"), "config.wandb.tags: expected a list of strings"),
    (dict(project="p", entity=3), "config.wandb.entity: expected a string"),
])
def test_bad_wandb_sections_are_config_errors(section, message):
    with pytest.raises(ConfigError) as e:
        validate.validate_wandb(ConfigDict(dict(wandb=section)))
    assert message in str(e.value)


def test_good_sections_pass_and_a_missing_package_is_named(monkeypatch):
    validate.validate_wandb(ConfigDict(dict(wandb=None)))
    validate.validate_wandb(ConfigDict(dict(wandb=dict(project="p", mode="offline", tags=["a"], name="run"))))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'crate_jax\[wandb\]'"):
        validate.validate_wandb(ConfigDict(dict(wandb=dict(project="p"))))
    validate.validate_wandb(ConfigDict(dict(wandb=dict(project="p", mode="disabled"))))  # needs no package


def test_command_line_wandb_errors_come_before_the_workdir(tmp_path, capsys):
    wd = tmp_path / "wd"
    code = train_main(["--config", "configs/digits.py", "--workdir", str(wd), "--config.wandb.project=p",
                       "--config.wandb.mode=sometimes"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("config error:") and "config.wandb.mode" in err, err
    assert not wd.exists()
