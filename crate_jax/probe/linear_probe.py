"""Linear probe on frozen features: multinomial logistic regression with a regularisation sweep.

Solver (the protocol of CLIP's linear-probe evaluation, in JAX):

1. Standardise the features with the train split's mean and std (std floored at 1e-6).
2. Hold out a stratified `val_fraction` (0.2) of the train split, fixed by `seed` (0).
3. For every `λ` in `lambdas` (default 10^-6, 10^-5, ..., 10^0): fit `softmax(x W + b)` by minimising the
   mean cross-entropy on the remaining train rows plus `λ ‖W‖²` (the bias is not penalised), full-batch
   L-BFGS (`optax.lbfgs`, its zoom line search) for `steps` (300) iterations from zero.
4. Keep the `λ` with the best held-out accuracy (ties: the larger `λ`), refit on the whole train split,
   report top-1 on the eval split.

Held-out rows are excluded by zero weights rather than by slicing, so one compiled solve serves every
`λ` and the refit. The arrays are replicated on every device; the solve is small (`d × C` parameters).

Evaluator `type='linear_probe'` (spec keys of `crate_jax.probe.features.ProbeData` plus `lambdas`,
`steps`, `val_fraction`, `seed`): metrics `top1`, `val_top1`, `lambda`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crate_jax.errors import ConfigError
from crate_jax.probe.features import ProbeData

LAMBDAS = tuple(10.0 ** e for e in range(-6, 1))
STEPS, VAL_FRACTION, SEED = 300, 0.2, 0


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic(x, y, weights, lam, *, num_classes: int, steps: int):
    """`(W [d, C], b [C])` minimising `Σ_i w_i CE_i / Σ_i w_i + λ ‖W‖²` by L-BFGS."""
    d = x.shape[1]
    w_sum = jnp.maximum(jnp.sum(weights), 1.0)
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)

    def objective(params):
        logits = x @ params["W"] + params["b"]
        ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
        return jnp.sum(ce * weights) / w_sum + lam * jnp.sum(jnp.square(params["W"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = {"W": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

    def body(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(p, updates), state), value

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return params["W"], params["b"]


def _predict(W, b, x):
    return np.argmax(np.asarray(x) @ np.asarray(W) + np.asarray(b), axis=1)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool mask of the held-out rows: `round(fraction · n_c)` of each class (at least one when it has >= 2)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held[rng.permutation(idx)[:n]] = True
    return held


def linear_probe(train_x, train_y, test_x, test_y, *, lambdas=LAMBDAS, steps: int = STEPS,
                 val_fraction: float = VAL_FRACTION, seed: int = SEED, num_classes: int | None = None) -> dict:
    """Runs the protocol of the module docstring on host arrays; returns `top1`, `val_top1`, `lambda`."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
    C = int(num_classes or (max(train_y.max(), test_y.max()) + 1))
    mean, std = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    held = stratified_holdout(train_y, val_fraction, seed)
    fit_w = jnp.asarray((~held).astype(np.float32))
    best = None
    for lam in lambdas:
        W, b = fit_logistic(jnp.asarray(xtr), jnp.asarray(train_y), fit_w, jnp.float32(lam), num_classes=C, steps=steps)
        acc = float(np.mean(_predict(W, b, xtr[held]) == train_y[held])) if held.any() else 0.0
        if best is None or acc >= best[0]:
            best = (acc, float(lam))
    W, b = fit_logistic(jnp.asarray(xtr), jnp.asarray(train_y), jnp.ones(len(train_y), jnp.float32),
                        jnp.float32(best[1]), num_classes=C, steps=steps)
    return {"top1": float(np.mean(_predict(W, b, xte) == test_y)), "val_top1": best[0], "lambda": best[1]}


class LinearProbeEvaluator:
    """`type='linear_probe'`: logistic regression on the frozen features (module docstring)."""

    def __init__(self, name: str, spec, task, mesh):
        self.probe = ProbeData(name, spec, task, mesh, extra_keys=("lambdas", "steps", "val_fraction", "seed"))
        self.name, self.every = name, self.probe.every
        key = f"config.evals.{name}"
        self.lambdas = tuple(float(v) for v in (spec.get("lambdas", None) or LAMBDAS))
        if not self.lambdas or any(v < 0 for v in self.lambdas):
            raise ConfigError(f"{key}.lambdas: expected non-negative regularisation strengths, got {self.lambdas}")
        self.steps = spec.get("steps", STEPS)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"{key}.steps: expected an integer >= 1, got {self.steps!r}")
        self.val_fraction = float(spec.get("val_fraction", VAL_FRACTION))
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{key}.val_fraction: expected a fraction in (0, 1), got {self.val_fraction}")
        self.seed = int(spec.get("seed", SEED))

    def run(self, state) -> dict[str, float]:
        xtr, ytr = self.probe.extract(state, self.probe.train_split)
        xte, yte = self.probe.extract(state, self.probe.eval_split)
        return linear_probe(xtr, ytr, xte, yte, lambdas=self.lambdas, steps=self.steps,
                            val_fraction=self.val_fraction, seed=self.seed)
