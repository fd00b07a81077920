"""What a TPU kernel's custom call costs, which XLA cannot see inside: its FLOPs and the HBM bytes it reads.

Used by `hlo_cost` for every custom call with no XLA computation inside (Pallas kernels: JAX's flash attention,
`crate_jax.models.tpu_mssa`). Pure functions of the call's name, its backend-config text and its operands' sizes
and dimensions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

_COST_ESTIMATE = re.compile(r'cost_estimate\\*"\s*:\s*\{\\*"flops\\*"\s*:\s*\\*"?(\d+)')
# Pallas kernels that carry no cost estimate, by the name the kernel gives its custom call: matmuls per
# (query, key) pair and head dimension, from operand 0 `q [B, K, T, p]` and operand 1 `k [B, K, S, p]`. The
# flash-attention backward recomputes the scores: dK/dV runs QKᵀ, dO Vᵀ, Pᵀ dO, dSᵀ Q (4 matmuls), dQ runs
# QKᵀ, dO Vᵀ, dS K (3). Like the forward kernel's own estimate, a causal kernel is counted in full.
_KERNEL_MATMULS = {"flash_mha_bwd_dkv": 4, "flash_mha_bwd_dq": 3}
_FLASH_BWD_BLOCK = re.compile(r"^flash_mha_bwd_dq_block_q_major_(\d+)")


def flops(name: str, attrs: str, dims: list[list[int]]) -> float:
    """FLOPs of a kernel: its own `cost_estimate` when the kernel wrote one, else the `_KERNEL_MATMULS` count
    for a kernel named there, else 0 (XLA knows nothing about an opaque kernel). `dims`: the operands'."""
    m = _COST_ESTIMATE.search(attrs)
    if m:
        return float(m.group(1))
    for prefix, matmuls in _KERNEL_MATMULS.items():
        if name.startswith(prefix) and len(dims) > 1 and len(dims[0]) == 4 and len(dims[1]) == 4:
            return 2.0 * matmuls * math.prod(dims[0]) * dims[1][2]
    return 0.0


def flash_forward_block(names: Iterable[str]) -> int:
    """The query block of a module's flash-attention forward kernel: its name does not say it, the dQ kernel's
    name does (`crate_jax.models.tpu_attention` uses one block size for all three); the kernel's default 128
    when the module has no backward kernel."""
    return next((int(m.group(1)) for n in names if (m := _FLASH_BWD_BLOCK.match(n))), 128)


def reads(name: str, sizes: list[int], dims: list[list[int]], forward_block: int = 128) -> int:
    """HBM bytes a kernel reads: every operand once, plus the blocks a flash-attention kernel streams again. Its
    forward and dQ kernels stream all of K and V once per query block (`T / block`); the dK/dV kernel streams
    all of its query-side operands (q, dO and the row statistics) once per key block. A causal kernel skips the
    blocks above the diagonal; it is counted in full (an upper bound). Any other kernel (MSSA's holds a whole
    sequence on chip): its operands once."""
    total = sum(sizes)
    if len(dims) < 3 or len(dims[0]) != 4 or len(dims[1]) != 4:
        return total
    if name.startswith("flash_attention") or name.startswith("flash_mha_bwd_dq"):
        m = re.search(r"block_q_major_(\d+)", name)
        blocks = dims[0][2] // (int(m.group(1)) if m else forward_block)
        return total + max(blocks - 1, 0) * (sizes[1] + sizes[2])
    if name.startswith("flash_mha_bwd_dkv"):
        m = re.search(r"block_k_major_(\d+)", name)
        blocks = dims[1][2] // (int(m.group(1)) if m else 128)
        return total + max(blocks - 1, 0) * (total - sizes[1] - sizes[2])
    return total
