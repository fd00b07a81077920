"""Config checks that run before anything compiles or touches the workdir, each naming the key, what
was expected and what to change. Task-specific keys are checked by the task (`Task.validate`), the
evaluators' by the evaluators, the model's by its config class, the mesh's by `parallel.mesh`."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from ml_collections import ConfigDict

from crate_jax.models import ConfigError
from crate_jax.parallel.mesh import data_parallel_size

OPTIM_KEYS = ("name", "lr", "min_lr", "warmup_steps", "schedule", "b1", "b2", "eps", "mu_dtype", "wd", "wd_end",
              "wd_mask", "clip", "clip_mode", "clip_fuse", "freeze", "lr_mults",
              "dino_schedule", "freeze_steps", "warmup_frac")
INIT_KEYS = ("checkpoint", "dont_load", "posemb_resample")
WANDB_KEYS = ("project", "mode", "entity", "name", "group", "tags")  # passed to wandb.init as they are
WANDB_MODES = ("online", "offline", "disabled")
SCHEDULES = ("cosine", "constant", "linear")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def need_int(config: ConfigDict, key: str, lo: int, *, optional: bool = False, what: str = "") -> None:
    """`config[key]` (a dotted key) is an integer >= lo (or absent / None when `optional`)."""
    node = _lookup(config, key)
    if node is _MISSING or node is None:
        if optional:
            return
        raise ConfigError(f"config.{key} is missing; expected an integer >= {lo}{what}")
    if not _is_int(node) or node < lo:
        raise ConfigError(f"config.{key}: expected an integer >= {lo}{what}, got {node!r}")


def need_number(config: ConfigDict, key: str, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, optional: bool = False, what: str = "") -> None:
    node = _lookup(config, key)
    if node is _MISSING or node is None:
        if optional:
            return
        raise ConfigError(f"config.{key} is missing; expected a number{what}")
    bad = not _is_num(node)
    if not bad and lo is not None:
        bad = node <= lo if lo_open else node < lo
    if not bad and hi is not None:
        bad = node >= hi if hi_open else node > hi
    if bad:
        rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
        raise ConfigError(f"config.{key}: expected a finite number in {rng}{what}, got {node!r}")


def need_choice(config: ConfigDict, key: str, choices, *, optional: bool = False) -> None:
    node = _lookup(config, key)
    if (node is _MISSING or node is None) and optional:
        return
    if node not in choices:
        raise ConfigError(f"config.{key}: got {node!r}, expected one of {tuple(choices)}")


def need_regex(config: ConfigDict, key: str, value, *, what: str = "a regular expression") -> None:
    try:
        re.compile(value)
    except (re.error, TypeError) as e:
        raise ConfigError(f"config.{key}: {value!r} is not {what}: {e}") from None


def known_keys(section, name: str, keys) -> None:
    unknown = sorted(set(section.keys()) - set(keys)) if isinstance(section, (ConfigDict, dict)) else []
    if unknown:
        import difflib
        hints = [f"{u!r} -> {m[0]!r}" for u in unknown for m in [difflib.get_close_matches(u, list(keys), n=1)] if m]
        raise ConfigError(f"config.{name}: unknown keys {unknown}"
                          + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                          + f"; known keys are {sorted(keys)}")


_MISSING = object()


def _lookup(config: ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, (ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


def validate_config(config: ConfigDict) -> None:
    """The engine's keys: seed, batch and run length, logging / checkpoint / eval schedules, optimizer, init."""
    for key in ("seed", "batch_size", "optim", "mesh"):
        if key not in config:
            raise ConfigError(f"config is missing '{key}'")
    need_int(config, "seed", 0)
    need_int(config, "batch_size", 1)
    if config.get("total_steps") is not None:
        need_int(config, "total_steps", 1, what=" (or leave it unset and set num_epochs)")
    elif config.get("num_epochs") is None:
        raise ConfigError("config needs total_steps (an integer >= 1) or num_epochs")
    need_number(config, "num_epochs", lo=0, lo_open=True, optional=True, what=" (used when total_steps is unset)")
    need_int(config, "microbatches", 1, optional=True)
    mb = config.get("microbatches", 1) or 1
    if config.batch_size % mb:
        raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by config.microbatches {mb}")
    need_int(config, "log_every", 1, optional=True, what=" (steps between progress lines)")
    need_int(config, "checkpoint_every", 1, optional=True, what=" (steps between checkpoints)")
    need_int(config, "eval_every", 0, optional=True, what=" (0: evaluate only at the end)")
    need_int(config, "eval_batch_size", 1, optional=True)
    need_int(config, "keep_checkpoints", 1, optional=True, what=" (how many recent checkpoints to keep)")
    need_int(config, "keep_period", 1, optional=True, what=" (or None)")
    if config.get("async_checkpoints") is not None and not isinstance(config.async_checkpoints, bool):
        raise ConfigError(f"config.async_checkpoints: expected true or false, got {config.async_checkpoints!r}")
    validate_optim(config)
    validate_wandb(config)
    init = config.get("init", None)
    if init is not None:
        known_keys(init, "init", INIT_KEYS)
        ck = init.get("checkpoint")
        if ck is not None and not isinstance(ck, str):
            raise ConfigError(f"config.init.checkpoint: expected a path (a bundle or a training workdir), got {ck!r}")
        if init.get("dont_load"):
            need_regex(config, "init.dont_load", init.dont_load)
        need_choice(config, "init.posemb_resample", ("1d", "2d"), optional=True)


def validate_optim(config: ConfigDict) -> None:
    from crate_jax.train.optim import OPTIMIZERS
    o = config.optim
    known_keys(o, "optim", OPTIM_KEYS)
    need_choice(config, "optim.name", OPTIMIZERS, optional=True)
    need_number(config, "optim.lr", lo=0, lo_open=True, what=" (the peak learning rate)")
    need_number(config, "optim.min_lr", lo=0, hi=float(o.lr), optional=True, what=" (at most optim.lr)")
    need_int(config, "optim.warmup_steps", 0, optional=True)
    need_number(config, "optim.warmup_frac", lo=0, hi=1, optional=True, what=" (warm-up as a fraction of the run)")
    need_choice(config, "optim.schedule", SCHEDULES, optional=True)
    for key in ("b1", "b2"):
        need_number(config, f"optim.{key}", lo=0, hi=1, hi_open=True, optional=True)
    need_number(config, "optim.eps", lo=0, lo_open=True, optional=True)
    need_number(config, "optim.wd", lo=0, optional=True)
    need_number(config, "optim.wd_end", lo=0, optional=True, what=" (cosine weight-decay schedule target)")
    need_number(config, "optim.clip", lo=0, optional=True, what=" (0: no clipping)")
    if o.get("mu_dtype") is not None:
        need_choice(config, "optim.mu_dtype", ("float32", "bfloat16", "float16"))
    if o.get("wd_mask"):
        need_regex(config, "optim.wd_mask", o.wd_mask)
    for i, f in enumerate(o.get("freeze", None) or []):
        need_regex(config, f"optim.freeze[{i}]", f)
    for i, pair in enumerate(o.get("freeze_steps", None) or []):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[1], int) or pair[1] < 0:
            raise ConfigError(f"config.optim.freeze_steps[{i}]: expected (regex, steps >= 0), got {pair!r}")
        need_regex(config, f"optim.freeze_steps[{i}]", pair[0])
    for i, pair in enumerate(o.get("lr_mults", None) or []):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not _is_num(pair[1]) or pair[1] < 0:
            raise ConfigError(f"config.optim.lr_mults[{i}]: expected (regex, multiplier >= 0), got {pair!r}")
        need_regex(config, f"optim.lr_mults[{i}]", pair[0])


def validate_wandb(config: ConfigDict) -> None:
    """`config.wandb`: None, or dict(project=NAME, mode='online'|'offline'|'disabled', entity=, name=, group=,
    tags=[...]); the `wandb` package must be importable unless the mode is 'disabled'."""
    w = config.get("wandb", None)
    if w is None:
        return
    if not isinstance(w, (ConfigDict, dict)):
        raise ConfigError(f"config.wandb: expected None or dict(project=NAME, mode='online'|'offline'|'disabled'), "
                          f"got {w!r}")
    known_keys(w, "wandb", WANDB_KEYS)
    project = w.get("project")
    if not isinstance(project, str) or not project:
        raise ConfigError(f"config.wandb.project: expected the W&B project name (a non-empty string), got {project!r}")
    need_choice(config, "wandb.mode", WANDB_MODES, optional=True)
    for key in ("entity", "name", "group"):
        if w.get(key) is not None and not isinstance(w.get(key), str):
            raise ConfigError(f"config.wandb.{key}: expected a string or None, got {w.get(key)!r}")
    tags = w.get("tags")
    if tags is not None and (not isinstance(tags, (list, tuple)) or not all(isinstance(s, str) for s in tags)):
        raise ConfigError(f"config.wandb.tags: expected a list of strings, got {tags!r}")
    import importlib.util
    if w.get("mode") != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("config.wandb is set but the wandb package is not installed: pip install 'crate_jax[wandb]' "
                          "(or set config.wandb=None)")


def check_batch(config: ConfigDict, mesh) -> None:
    dp = data_parallel_size(mesh)
    b, mb, n_proc = config.batch_size, config.get("microbatches", 1) or 1, jax.process_count()
    if b % dp:
        raise ConfigError(f"config.batch_size {b} is not divisible by the data-parallel axes data×fsdp = {dp} "
                          f"(mesh {dict(mesh.shape)}); use a multiple of {dp}")
    if b % n_proc:
        raise ConfigError(f"config.batch_size {b} is not divisible by the {n_proc} processes")
    if (b // mb) % dp:
        raise ConfigError(f"each microbatch ({b} / {mb} = {b // mb}) must be divisible by data×fsdp = {dp}; "
                          f"change config.microbatches or config.batch_size")
    eb = config.get("eval_batch_size")
    if eb and (eb % dp or eb % n_proc):
        lcm = int(np.lcm(dp, n_proc))
        raise ConfigError(f"config.eval_batch_size {eb} is not divisible by the data-parallel axes data×fsdp = {dp} "
                          f"(mesh {dict(mesh.shape)}) and the {n_proc} processes; use a multiple of {lcm}, e.g. "
                          f"{lcm * max(1, round(eb / lcm))}")
