"""Does this run fit the workdir it resumes? Settled before anything in the workdir changes.

* `refuse_changed_stream(workdir, config, has_checkpoints)`: keys that decide which batches and which
  random numbers a step sees (`STREAM_KEYS`) must match the workdir's `config.json` when checkpoints
  exist; otherwise the resumed run would silently continue another run's curve. A `StateError` names
  the keys and the stored values. Other changes (the learning rate, say) are allowed and said
  (`config_changes`).
* `DataStateCheck(train_it)`: applied to each checkpoint's data-iterator state while restoring. A state
  of the wrong structure (valid JSON, but not what this iterator writes) is damage: the step is set
  aside like an unreadable file. A state of another stream (its fingerprint differs: seed, split,
  process layout, ...) belongs to another run: a `CheckpointError`, nothing touched.
* `write_run_metadata`: `config.json` / `model.json`, written only after both checks passed.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
from ml_collections import ConfigDict

from crate_jax.checkpoint.training import CheckpointError
from crate_jax.models import registry as model_registry

# The train step's random numbers and the data order follow `seed`; the data iterators' fingerprints
# (checked per step by DataStateCheck) cover the rest of the stream: source, split, process layout.
STREAM_KEYS = ("seed",)
# Parts of an iterator state that say which stream it belongs to (the iterators' `fingerprint` / `config`).
_IDENTITY = ("fingerprint", "config", "version")


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stored_config(workdir) -> dict | None:
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def config_changes(workdir, config: ConfigDict) -> list[str]:
    """`'optim.lr: 0.001 -> 0.0005'` for every leaf that differs from the workdir's `config.json`."""
    old = _stored_config(workdir)
    if old is None:
        return []
    if not old:
        return ["(the stored config.json is not JSON)"]
    a, b = _flat(old), _flat(json.loads(config.to_json_best_effort()))
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def refuse_changed_stream(workdir, config: ConfigDict, has_checkpoints: bool) -> None:
    """Raises `CheckpointError` (exit 3) if a `STREAM_KEYS` key differs from the stored `config.json` while
    the workdir holds checkpoints (see the module docstring)."""
    old = _stored_config(workdir)
    if not has_checkpoints or not old:
        return
    a, b = _flat(old), _flat(json.loads(config.to_json_best_effort()))
    diff = [f"{k}: stored {a.get(k, '(unset)')!r}, now {b.get(k, '(unset)')!r}" for k in STREAM_KEYS
            if k in a and a.get(k) != b.get(k)]
    if diff:
        raise CheckpointError(
            f"this run does not fit {workdir}: its checkpoints were trained with other values of keys that decide "
            f"the data order and random numbers ({'; '.join(diff)}, see {workdir / 'config.json'}). Rerun with the "
            f"stored values to resume, or use a new workdir; nothing in the workdir was changed")


def _kind(x) -> str:
    if isinstance(x, Mapping):
        return "object"
    if isinstance(x, (list, tuple)):
        return "list"
    if isinstance(x, bool) or x is None:
        return type(x).__name__
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def structure_problem(expected: Mapping[str, Any], saved: Any) -> str | None:
    """Why `saved` cannot be a state of the iterator whose fresh state is `expected` (top-level keys and
    the kind of each value; the inner layout is the iterator's to check), or None."""
    if not isinstance(saved, Mapping):
        return f"is a JSON {_kind(saved)}, not an object"
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        return (f"has keys {sorted(saved)}, expected {sorted(expected)}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    for k, v in expected.items():
        if v is not None and saved[k] is not None and _kind(v) != _kind(saved[k]):
            return f"holds a {_kind(saved[k])} at {k!r}, expected a {_kind(v)}"
    return None


def stream_differences(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """`'seed: saved 0, now 1'` for every identity field (`_IDENTITY`) that differs."""
    out = []
    for part in _IDENTITY:
        if part not in expected:
            continue
        a, b = saved.get(part), expected[part]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{k}: saved {a.get(k, '(unset)')!r}, now {b.get(k, '(unset)')!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{part}: saved {a!r}, now {b!r}")
    return out


class DataStateCheck:
    """`check(step, saved) -> problem | None`: applies a checkpoint's data-iterator state to `train_it`
    (see the module docstring). None: applied. A string: the state is damaged (the step is set aside).
    Raises `CheckpointError` for another stream's state."""

    def __init__(self, train_it):
        self.train_it = train_it
        self.expected = train_it.get_state()  # a fresh iterator's state: the structure a save writes

    def __call__(self, step_dir, saved) -> str | None:
        problem = structure_problem(self.expected, saved)
        if problem:
            return f"holds a data-iterator state of the wrong structure: it {problem}"
        diff = stream_differences(self.expected, saved)
        if diff:
            raise CheckpointError(
                f"{step_dir}: its data-iterator state was saved for another data stream ({'; '.join(diff[:6])}). "
                f"Resume with the data config, seed and process layout that wrote it, or use a new workdir; "
                f"nothing in the workdir was changed")
        try:
            self.train_it.set_state(saved)
        except Exception as e:  # noqa: BLE001 - any failure to apply a well-formed state means damage
            return f"holds a data-iterator state that cannot be applied: {type(e).__name__}: {_one_line(e)}"
        return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def write_run_metadata(workdir, config: ConfigDict, model_cfg) -> None:
    """`config.json` (the run's config) and `model.json` (the model, for `export` / `predict`; only for a
    model config of a registered kind)."""
    if jax.process_index() != 0:
        return
    from crate_jax.checkpoint.bundle import MODEL_JSON
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if model_cfg is None:
        return
    meta = {"kind": model_registry.kind_of(model_cfg), "config": model_cfg.to_dict(), "source": "training"}
    (workdir / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
