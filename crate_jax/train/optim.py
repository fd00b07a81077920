"""Optimizer: the official CRATE-α construction (SPEC §7.1), plus Lion and parameter freezing.

`update = −lr · s(t) · (adam(g) + wd · θ)` with `g` clipped by global norm, weight decay only on
parameters whose path matches `wd_mask` (the official `.*/kernel$`), and frozen parameters
(`freeze`, a list of regexes) getting neither updates nor optimizer state. Parameter groups with
their own learning rate: `lr_mults`, a list of `(regex, multiplier)` pairs (the first match wins),
scales those parameters' updates, i.e. their learning rate, by the multiplier.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from crate_jax.models.config import ConfigError

OPTIMIZERS = ("adamw", "lion")
CLIP_MODES = ("global", "per_param")


def path_str(path) -> str:
    """`('encoder', 'blocks', 'mssa', 'proj', 'kernel')` -> `'encoder/blocks/mssa/proj/kernel'`."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def path_mask(params, pattern: str | None):
    """Tree of bools: True where the '/'-joined parameter path fully matches `pattern`."""
    rx = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx and rx.fullmatch(path_str(p))), params)


def schedule(cfg: ConfigDict, total_steps: int):
    """`s(t) = min(1, t/warmup) · (r + (1 − r)·½(1 + cos(π·progress)))`, `r = min_lr/lr` (SPEC §7.1);
    returns the learning rate `lr · s(t)`."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    r = float(cfg.get("min_lr", 0.0)) / lr if cfg.get("min_lr", 0.0) else 0.0
    kind = cfg.get("schedule", "cosine")

    def fn(step):
        t = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, t / warmup) if warmup > 0 else 1.0
        if kind == "constant":
            return lr * warm
        progress = jnp.clip((t - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
        return lr * warm * (r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return fn


def wd_schedule(cfg: ConfigDict, total_steps: int):
    """The weight-decay rate: `wd` constant, or (with `wd_end`) a cosine from `wd` at step 0 to `wd_end`
    at the last step (DINO / SimDINO: 0.04 -> 0.4). Decoupled: the update adds `lr · s(t) · wd(t) · θ`."""
    wd = float(cfg.get("wd", 0.0) or 0.0)
    if cfg.get("wd_end") is None:
        return wd
    end = float(cfg.wd_end)

    def fn(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(1, total_steps - 1), 0.0, 1.0)
        return end + (wd - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return fn


def clip_per_parameter(max_norm: float) -> optax.GradientTransformation:
    """DINO / SimDINO `utils.clip_gradients`: each parameter's gradient is scaled by
    `min(1, max_norm / (‖g‖ + 1e-6))` on its own (not by the global norm)."""
    def clip(updates, params=None):
        def one(g):
            coef = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)
        return jax.tree.map(one, updates)
    return optax.stateless(clip)


def _scale_by_group(params, lr_mults: list[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by the multiplier of the first `(regex, multiplier)` its path
    fully matches (1 if none)."""
    rx = [(re.compile(p), m) for p, m in lr_mults]
    mults = jax.tree_util.tree_map_with_path(
        lambda p, _: next((m for r, m in rx if r.fullmatch(path_str(p))), 1.0), params)
    return optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults))


def build_optimizer(cfg: ConfigDict, params, total_steps: int) -> tuple[optax.GradientTransformation, callable]:
    """Returns `(tx, lr_fn)`. `cfg` fields: name, lr, min_lr, warmup_steps, b1, b2, mu_dtype, wd, wd_mask,
    clip, clip_mode ('global' norm, the default, or 'per_param'), freeze (list of regexes), lr_mults (list of
    (regex, multiplier)), wd_end (cosine weight-decay schedule to this value)."""
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optim.name: got {name!r}, expected one of {OPTIMIZERS}")
    lr_fn = schedule(cfg, total_steps)
    mu_dtype = jnp.dtype(cfg.mu_dtype) if cfg.get("mu_dtype") else None
    parts = []
    clip_mode = cfg.get("clip_mode", None) or "global"
    if clip_mode not in CLIP_MODES:
        raise ConfigError(f"config.optim.clip_mode: got {clip_mode!r}, expected one of {CLIP_MODES}")
    if cfg.get("clip"):
        parts.append(optax.clip_by_global_norm(float(cfg.clip)) if clip_mode == "global"
                     else clip_per_parameter(float(cfg.clip)))
    if name == "adamw":
        parts.append(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                                         mu_dtype=mu_dtype))
    else:
        parts.append(optax.scale_by_lion(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.99), mu_dtype=mu_dtype))
    if cfg.get("wd") or cfg.get("wd_end"):
        parts.append(optax.add_decayed_weights(wd_schedule(cfg, total_steps),
                                               mask=path_mask(params, cfg.get("wd_mask", r".*kernel"))))
    parts.append(optax.scale_by_learning_rate(lr_fn))
    lr_mults = [(str(p), float(m)) for p, m in (cfg.get("lr_mults", None) or [])]
    if lr_mults:
        parts.append(_scale_by_group(params, lr_mults))
    tx = optax.chain(*parts)
    freeze = list(cfg.get("freeze", []) or [])
    if freeze:
        rx = [re.compile(f) for f in freeze]
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if any(r.fullmatch(path_str(p)) for r in rx) else "train", params)
        if not any(l == "train" for l in jax.tree.leaves(labels)):
            raise ConfigError(f"config.optim.freeze {freeze} freezes every parameter")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, lr_fn
