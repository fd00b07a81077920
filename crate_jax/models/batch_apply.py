"""One padded, jitted batch loop for every inference path (predict, LM logits, MAE patches, k-NN votes).

`apply_in_batches(fn, arrays, batch_size)` cuts the leading axis of `arrays` into batches of one fixed
size, zero-pads the last one (so `fn` compiles once) and drops the padding from the outputs. With a
`mesh`, each batch is placed sharded over the data-parallel axes (its size rounded to a multiple of
them) and the outputs are gathered replicated, so every process can read them.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


@functools.lru_cache(maxsize=None)
def replicator(mesh):
    """A jitted identity whose outputs are replicated over `mesh` (every process can read them)."""
    return jax.jit(lambda *xs: xs, out_shardings=NamedSharding(mesh, P()))


def apply_in_batches(fn: Callable, arrays: np.ndarray | Sequence[np.ndarray], batch_size: int, *, mesh=None,
                     dtypes: Sequence | None = None):
    """`fn(*batch)` over the rows of `arrays` (each `[N, ...]`, numpy or memory-mapped), concatenated: an
    array (or a tuple of arrays when `fn` returns several) with `N` rows. `dtypes` casts each input per
    batch (e.g. float32 for memory-mapped float16 images)."""
    single = isinstance(arrays, np.ndarray) or hasattr(arrays, "shape")
    arrays = [arrays] if single else list(arrays)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = int(arrays[0].shape[0])
    if any(int(a.shape[0]) != n for a in arrays):
        raise ValueError(f"inputs have different numbers of rows: {[a.shape[0] for a in arrays]}")
    if n == 0:
        raise ValueError("no rows to process")
    bs = max(1, min(batch_size, n))
    rows = gather = None
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        bs = max(dp, batch_size // dp * dp)
        gather = replicator(mesh)
    outs = []
    for start in range(0, n, bs):
        batch = []
        for i, a in enumerate(arrays):
            x = np.asarray(a[start:start + bs])
            if dtypes is not None and dtypes[i] is not None:
                x = x.astype(dtypes[i])
            real = x.shape[0]
            if real < bs:  # zero rows: one compiled shape for every batch
                x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], x.dtype)])
            if mesh is not None:
                rows = NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1))))
                x = jax.device_put(x, rows)
            batch.append(x)
        y = fn(*batch)
        if gather is not None:
            y = gather(*y) if isinstance(y, tuple) else gather(y)[0]
        outs.append(jax.tree.map(lambda o: np.asarray(o)[:real], y))
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)
