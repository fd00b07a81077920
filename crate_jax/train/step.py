"""The pure, jitted train step: loss → gradients (optionally over microbatches) → optimizer update →
the task's extras update.

The state is a plain dict of arrays (`crate_jax.train.task` describes its parts); the per-step
random key is `fold_in(key(seed), step)`, so it never needs saving and a resumed run draws the same
numbers. `train/finite` (1 or 0) says whether the loss, the gradients and the updated parameters are
all finite: the loop never checkpoints a state for which it is 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from crate_jax.train.state import state_parts, train_state


def all_finite(tree) -> jax.Array:
    """One boolean: every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(graphdef, task, tx: optax.GradientTransformation, lr_fn, *, seed: int, microbatches: int = 1):
    """`step(state, batch) -> (state, metrics)` for `task` (see `crate_jax.train.task.Task.loss`)."""

    def loss_of_params(params, buffers, batch, rng, extras):
        loss, metrics, aux = task.loss(nnx.merge(graphdef, params, buffers), batch, rng, extras)
        return loss, (metrics, aux)

    grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        params, buffers, extras = state_parts(state)
        if microbatches == 1:
            (loss, (metrics, aux)), grads = grad_fn(params, buffers, batch, rng, extras)
        else:
            def split(x):  # [B, ...] -> [M, B/M, ...], microbatch i = rows i, M+i, 2M+i, ...
                return jnp.swapaxes(x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]), 0, 1)
            mbs = jax.tree.map(split, batch)

            def body(carry, xs):
                mb, i = xs
                out = grad_fn(params, buffers, mb, jax.random.fold_in(rng, i), extras)
                return jax.tree.map(jnp.add, carry, out), None

            shapes = jax.eval_shape(grad_fn, params, buffers, jax.tree.map(lambda x: x[0], mbs), rng, extras)
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            total, _ = jax.lax.scan(body, zero, (mbs, jnp.arange(microbatches)))
            (loss, (metrics, aux)), grads = jax.tree.map(lambda x: x / microbatches, total)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new = train_state(state["step"] + 1, new_params, opt_state, buffers,
                          task.update_extras(extras, new_params, state["step"], aux) if extras else None)
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params) & all_finite(new.get("extras", {}))
        metrics = dict(metrics)
        metrics.update({"train/loss": loss, "train/lr": lr_fn(state["step"]),
                        "train/grad_norm": optax.global_norm(grads),
                        "train/param_norm": optax.global_norm(new_params),
                        "train/finite": finite.astype(jnp.float32)})
        return new, metrics

    return step
