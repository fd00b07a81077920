"""The TPU attention path (`crate_jax.models.tpu_attention`): the Pallas flash-attention kernel run by JAX's TPU
interpreter on CPU, with the padding of ragged sequences to whole blocks kept out of the softmax, against the
explicit attention (values and gradients); and the per-device wrapper on 8 simulated devices, equal to the
unsharded result. On TPU the same code compiles for a slice (`python -m crate_jax.aot`, bench/RESULTS.md)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from crate_jax.models import act_sharding, layers as L, tpu_attention as ta


def _loss(f):
    return lambda x: jnp.sum(jnp.sin(f(x)))


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_with_padded_blocks_matches_explicit_attention(causal):
    x = jax.random.normal(jax.random.key(0), (2, 130, 2, 16), jnp.float32)  # 130 tokens: two blocks, one padded
    flash = lambda x: ta.flash_attend(x, x, x, causal=causal, mesh=None)  # noqa: E731
    explicit = lambda x: L.attend(x, x, x, impl="explicit", causal=causal)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(flash)(x)
        grad = jax.jit(jax.grad(_loss(flash)))(x) if not causal else None
    np.testing.assert_allclose(out, explicit(x), atol=2e-5)
    if grad is not None:
        np.testing.assert_allclose(grad, jax.grad(_loss(explicit))(x), atol=2e-5)


def test_per_device_wrapper_on_a_mesh_equals_unsharded(monkeypatch):
    """Batch over (data, fsdp), heads over tensor: each device attends its own sequences and heads. The kernel is
    replaced by the explicit form here (JAX's TPU interpreter runs one device at a time)."""
    def local(q, k, v, *, causal, t, s):
        sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        return sw(L.attend(sw(q), sw(k), sw(v), impl="explicit", causal=causal))
    monkeypatch.setattr(ta, "_local", local)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    x = jax.random.normal(jax.random.key(1), (8, 20, 4, 8), jnp.float32)
    for causal in (False, True):
        sharded = jax.jit(lambda x: ta.flash_attend(x, x, x, causal=causal, mesh=mesh))(x)
        np.testing.assert_allclose(sharded, L.attend(x, x, x, impl="explicit", causal=causal), atol=1e-6)
    # a batch the mesh does not divide stays whole on every device (still correct)
    y = x[:6]
    np.testing.assert_allclose(jax.jit(lambda y: ta.flash_attend(y, y, y, causal=False, mesh=mesh))(y),
                               L.attend(y, y, y, impl="explicit"), atol=1e-6)


def test_fused_attention_uses_the_kernel_only_on_tpu_meshes():
    cpu_mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
    assert not ta.on_tpu(cpu_mesh) and not ta.on_tpu(None)  # the test machine's backend is the CPU
    assert ta.worth_it(1024, 1024, True) and ta.worth_it(512, 512, True)
    assert (ta.block_size(1024, 1024), ta.block_size(768, 768), ta.block_size(640, 640)) == (512, 256, 128)
    assert not ta.worth_it(197, 197, True) and not ta.worth_it(785, 785, False) and not ta.worth_it(1024, 50, True)
    x = jax.random.normal(jax.random.key(2), (2, 5, 2, 4), jnp.float32)
    with act_sharding.activation_mesh(cpu_mesh):
        out = L.attend(x, x, x, impl="fused")
    np.testing.assert_allclose(out, L.attend(x, x, x, impl="explicit"), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'crate_jax[aot]')")
def test_compiled_for_a_tpu_slice_the_kernel_runs_per_chip_and_is_costed():
    """With libtpu (compile-only): the fused causal attention of a 520-token batch on a 4-chip v5e slice compiles
    to the flash kernels on each chip's quarter of the batch, and the breakdown counts their matmuls (a causal
    kernel in full); a 197-token batch keeps the explicit form (`tpu_attention.worth_it`)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from crate_jax import aot
    from crate_jax.parallel import hlo_cost

    devices = aot.tpu_devices(aot.parse_topology("v5e-4"))
    mesh = Mesh(np.array(devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"))

    def loss(x):
        with act_sharding.activation_mesh(mesh):
            return jnp.sum(L.attend(x, x, x, impl="fused", causal=True).astype(jnp.float32) ** 2)

    def kernels(b, t, k, p):
        x = jax.ShapeDtypeStruct((b, t, k, p), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
        text = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
        return text, [c for c in hlo_cost.Breakdown.of(text).charges if c.opcode == "custom-call"]
    b, k, p = 16, 4, 64
    text, calls = kernels(b, 520, k, p)
    assert len(calls) == 3  # forward, dK/dV, dQ
    pairs = (b // 4) * k * 640 * 640 * p  # per chip, padded to five 128-token blocks
    assert sum(c.flops for c in calls) >= 2 * (2 + 4 + 3) * pairs
    assert "bf16[4,4,640,64]" in text  # a quarter of the batch per chip, heads first, padded
    assert kernels(b, 197, k, p)[1] == []
    text, calls = kernels(8, 1024, 2, 64)  # 1,024 tokens: 512-token blocks (fewer re-reads of K and V)
    assert len(calls) == 3 and any(c.name.startswith("flash_mha_bwd_dkv_block_q_major_512") for c in calls)
