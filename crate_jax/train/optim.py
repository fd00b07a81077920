"""Optimizer: the official CRATE-α construction (docs/math.md §Optimizer), plus Lion and parameter freezing.

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

from crate_jax.errors import ConfigError

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
    """`s(t) = min(1, t/warmup) · (r + (1 − r)·½(1 + cos(π·progress)))`, `r = min_lr/lr` (docs/math.md §Optimizer);
    returns the learning rate `lr · s(t)`. With `dino_schedule` the warm-up is DINO's `cosine_scheduler` grid,
    `t/(warmup − 1)` for `t < warmup` (its `np.linspace(0, lr, warmup)`), the cosine part unchanged."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    if not warmup and cfg.get("warmup_frac"):  # a fraction of a run whose length comes from num_epochs (fine-tuning)
        warmup = int(round(float(cfg.warmup_frac) * total_steps))
    r = float(cfg.get("min_lr", 0.0)) / lr if cfg.get("min_lr", 0.0) else 0.0
    kind = cfg.get("schedule", "cosine")

    dino = bool(cfg.get("dino_schedule", False))

    def fn(step):
        t = jnp.asarray(step, jnp.float32)
        if warmup > 0 and dino:  # DINO `cosine_scheduler`: np.linspace(0, lr, W) over steps 0..W−1
            warm = jnp.where(t < warmup, t / max(1, warmup - 1), 1.0)
        else:
            warm = jnp.minimum(1.0, t / warmup) if warmup > 0 else 1.0
        if kind == "constant":
            return lr * warm
        progress = jnp.clip((t - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
        if kind == "linear":  # BERT / RoBERTa: straight down to min_lr at the last step
            return lr * warm * (r + (1.0 - r) * (1.0 - progress))
        return lr * warm * (r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return fn


def wd_schedule(cfg: ConfigDict, total_steps: int):
    """The weight-decay rate: `wd` constant, or (with `wd_end`) a cosine from `wd` at step 0 to `wd_end`
    at the last step (DINO / SimDINO: 0.04 -> 0.4). Decoupled: the update adds `lr · s(t) · wd(t) · θ`.
    With `dino_schedule` the cosine runs over `t/T` as DINO's `cosine_scheduler` (it never reaches `wd_end`)."""
    wd = float(cfg.get("wd", 0.0) or 0.0)
    if cfg.get("wd_end") is None:
        return wd
    end = float(cfg.wd_end)
    span = total_steps if cfg.get("dino_schedule", False) else total_steps - 1  # DINO: i/T, i < T

    def fn(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(1, span), 0.0, 1.0)
        return end + (wd - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return fn


QKV_FUSE = r".*/(query|key|value)/(?:kernel|bias)"  # DINO's fused `attn.qkv.{weight,bias}`


def clip_groups(params, param_axes=None, fuse: list[str] | tuple[str, ...] = ()):
    """`(group, stacked)` trees for `clip_per_parameter`. `stacked` is True where the parameter's first
    logical axis is `layers` (blocks stored stacked over depth: each layer's slice is its own tensor).
    `group` names the tensors that share one norm: the parameter's own path, or, where the path fully
    matches a `fuse` regex, the path with the regex's first group cut out (so `.../query/kernel`,
    `.../key/kernel` and `.../value/kernel` share one norm, as one fused qkv weight does)."""
    rx = [re.compile(QKV_FUSE if f == "qkv" else f) for f in fuse]

    def group(path, _):
        name = path_str(path)
        for r in rx:
            m = r.fullmatch(name)
            if m and m.groups() and m.group(1) is not None:
                return f"{r.pattern}:{name[:m.start(1)]}*{name[m.end(1):]}"
        return name
    groups = jax.tree_util.tree_map_with_path(group, params)
    if param_axes is None:
        stacked = jax.tree.map(lambda _: False, params)
    else:
        stacked = jax.tree.map(lambda a: bool(a.names) and a.names[0] == "layers", param_axes,
                               is_leaf=lambda x: hasattr(x, "names"))
    by_group: dict[str, set] = {}
    for g, st in zip(jax.tree.leaves(groups), jax.tree.leaves(stacked)):
        by_group.setdefault(g, set()).add(st)
    mixed = [g for g, v in by_group.items() if len(v) > 1]
    if mixed:
        raise ConfigError(f"config.optim.clip_fuse groups stacked and unstacked parameters together ({mixed[0]}); "
                          f"make the regex match parameters of one block")
    return groups, stacked


def clip_per_parameter(max_norm: float, groups=None, stacked=None) -> optax.GradientTransformation:
    """DINO / SimDINO `utils.clip_gradients`: each parameter's gradient is scaled by
    `min(1, max_norm / (‖g‖ + 1e-6))` on its own (not by the global norm). A parameter stored stacked over
    layers (`stacked`) is one tensor per layer, as in the official per-layer modules: its norm and scale are
    taken per slice of the leading axis. Parameters of one `groups` name share a norm (a fused qkv)."""
    def clip(updates, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        gs = jax.tree.leaves(groups) if groups is not None else [str(i) for i in range(len(leaves))]
        st = jax.tree.leaves(stacked) if stacked is not None else [False] * len(leaves)

        def sumsq(g, is_stacked):
            sq = jnp.square(g.astype(jnp.float32))
            return jnp.sum(sq, axis=tuple(range(1, g.ndim))) if is_stacked and g.ndim else jnp.sum(sq)
        totals: dict[str, jax.Array] = {}
        for g, name, s_ in zip(leaves, gs, st):
            totals[name] = totals[name] + sumsq(g, s_) if name in totals else sumsq(g, s_)
        out = []
        for g, name, s_ in zip(leaves, gs, st):
            coef = max_norm / (jnp.sqrt(totals[name]) + 1e-6)
            coef = jnp.minimum(coef, 1.0)
            if s_ and g.ndim:
                coef = coef.reshape((-1,) + (1,) * (g.ndim - 1))
            out.append(g * coef.astype(g.dtype))
        return jax.tree.unflatten(treedef, out)
    return optax.stateless(clip)


def freeze_for(params, freeze_steps: list[tuple[str, int]]) -> optax.GradientTransformation:
    """Zeroes the updates of parameters whose path fully matches a regex of `freeze_steps` while the step
    count is below that entry's step count (DINO's `cancel_gradients_last_layer` for its first epoch). The
    optimizer puts it both before Adam (zero gradients: the moments stay zero) and last (no weight decay)."""
    rx = [(re.compile(p), int(n)) for p, n in freeze_steps]
    until = jax.tree_util.tree_map_with_path(
        lambda p, _: next((n for r, n in rx if r.fullmatch(path_str(p))), 0), params)

    def init(_):
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        del params
        c = state["count"]
        out = jax.tree.map(lambda u, n: jnp.where(c < n, jnp.zeros_like(u), u) if n else u, updates, until)
        return out, {"count": c + 1}
    return optax.GradientTransformation(init, update)


def _scale_by_group(params, lr_mults: list[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by the multiplier of the first `(regex, multiplier)` its path
    fully matches (1 if none)."""
    rx = [(re.compile(p), m) for p, m in lr_mults]
    mults = jax.tree_util.tree_map_with_path(
        lambda p, _: next((m for r, m in rx if r.fullmatch(path_str(p))), 1.0), params)
    return optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults))


def build_optimizer(cfg: ConfigDict, params, total_steps: int, param_axes=None
                    ) -> tuple[optax.GradientTransformation, callable]:
    """Returns `(tx, lr_fn)`. `cfg` fields: name, lr, min_lr, warmup_steps, b1, b2, mu_dtype, wd, wd_mask,
    clip, clip_mode ('global' norm, the default, or 'per_param': each parameter, and each layer of a
    parameter stacked over layers, clipped on its own), clip_fuse (per_param: regexes, or 'qkv', whose
    matches share one norm), freeze (list of regexes), lr_mults (list of (regex, multiplier)), wd_end (cosine
    weight-decay schedule to this value), dino_schedule (DINO's warm-up and weight-decay grid), freeze_steps
    (list of (regex, steps): no update for those parameters before that step). `param_axes` (a tree of `Axes` matching `params`) tells which
    parameters are stacked over layers; without it every parameter counts as one tensor."""
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optim.name: got {name!r}, expected one of {OPTIMIZERS}")
    lr_fn = schedule(cfg, total_steps)
    mu_dtype = jnp.dtype(cfg.mu_dtype) if cfg.get("mu_dtype") else None
    parts = []
    clip_mode = cfg.get("clip_mode", None) or "global"
    if clip_mode not in CLIP_MODES:
        raise ConfigError(f"config.optim.clip_mode: got {clip_mode!r}, expected one of {CLIP_MODES}")
    freeze_steps = [(str(p), int(n)) for p, n in (cfg.get("freeze_steps", None) or [])]
    if freeze_steps:
        parts.append(freeze_for(params, freeze_steps))
    if cfg.get("clip"):
        if clip_mode == "global":
            parts.append(optax.clip_by_global_norm(float(cfg.clip)))
        else:
            fuse = cfg.get("clip_fuse", None) or ()
            fuse = [fuse] if isinstance(fuse, str) else list(fuse)
            parts.append(clip_per_parameter(float(cfg.clip), *clip_groups(params, param_axes, fuse)))
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
    if freeze_steps:
        parts.append(freeze_for(params, freeze_steps))
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
