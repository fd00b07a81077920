"""MSSA's short-sequence TPU kernel (`crate_jax.models.tpu_mssa`): the real kernel run by JAX's TPU interpreter on
CPU against the explicit attention `attend(w, w, w)` (values and gradients, ragged lengths, head groups that do
and do not fill 128 lanes); the per-device wrapper on 8 simulated devices against the unsharded result; the
dispatch rule; and, with libtpu (opt-in), the compiled kernels of a 4-chip slice."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from crate_jax.models import act_sharding, layers as L, tpu_mssa as tm


def _loss(f):
    return lambda x: jnp.sum(jnp.sin(f(x).astype(jnp.float32)))


def _explicit(w):
    return L.attend(w, w, w, impl="explicit")


@pytest.mark.parametrize("shape,causal,rows", [
    ((1, 197, 2, 64), False, None),  # 197 tokens (ragged), whole; two heads in one 128-lane block
    ((1, 37, 3, 40), True, None),    # three 40-wide heads: one block holds all of them; causal, whole
    ((1, 50, 2, 16), False, 16),     # query rows in chunks of 16 (16, 16, 16, 2), every chunk sees all keys
    ((1, 50, 2, 16), True, 16),      # causal chunks see keys up to their last row only
])
def test_kernel_matches_explicit_attention_values_and_gradients(shape, causal, rows, monkeypatch):
    if rows:  # long sequences are chunked (`tpu_mssa.ROWS` rows); smaller chunks here to keep the interpreter fast
        monkeypatch.setattr(tm, "ROWS", rows)
        monkeypatch.setattr(tm, "WHOLE", rows)
        assert len(tm._chunks(shape[1], causal)) == 4
    w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    kernel = lambda w: tm.self_attend(w, causal=causal, mesh=None)  # noqa: E731
    explicit = lambda w: L.attend(w, w, w, impl="explicit", causal=causal)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out, grad = jax.jit(kernel)(w), jax.jit(jax.grad(_loss(kernel)))(w)
    np.testing.assert_allclose(out, explicit(w), atol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(_loss(explicit))(w), atol=1e-5)


def test_causal_chunks_skip_the_blocks_above_the_diagonal():
    assert tm._chunks(197, False) == [(0, 197, 197)] and tm._chunks(200, True) == [(0, 200, 200)]
    assert tm._chunks(600, False) == [(0, 256, 600), (256, 512, 600), (512, 600, 600)]
    assert tm._chunks(1024, True) == [(0, 256, 256), (256, 512, 512), (512, 768, 768), (768, 1024, 1024)]
    # FLOPs per head and sequence: causal 1,024 tokens compute 10 of the 16 key blocks of 256 x 256
    assert tm._flops(1024, 64, True, forward=True) == 2 * 2 * 64 * 256 * 256 * 10
    assert tm._flops(197, 64, False, forward=False) == 2 * 4 * 64 * 197 * 197


def test_kernel_in_bfloat16_stays_close_to_float32_attention():
    w = jax.random.normal(jax.random.key(1), (2, 50, 2, 64), jnp.float32)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda w: tm.self_attend(w, causal=False, mesh=None))(w.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _explicit(w), atol=3e-2)


def test_blocks_fill_lanes_and_stay_small():
    assert (tm._heads_per_block(12, 64), tm._heads_per_block(16, 80), tm._heads_per_block(3, 40)) == (2, 8, 3)
    assert tm._heads_per_block(12, 128) == 1
    n = tm._rows(64, 197, 128, 4)  # 197 x 128 float32 rows: 98.5 KiB each, ten fit in 1 MiB, 8 divides 64
    assert n == 8 and tm._rows(7, 512, 1024, 4) == 1


def test_per_device_wrapper_on_a_mesh_equals_unsharded(monkeypatch):
    """Batch over (data, fsdp), heads over tensor. The kernel is replaced by the explicit form here (JAX's TPU
    interpreter runs one device at a time); what is tested is the split and the layout around it."""
    def local(x, k, p, causal):
        b, t, _ = x.shape
        y = x.reshape(b, t, k, p)
        return L.attend(y, y, y, impl="explicit", causal=causal).reshape(b, t, k * p)
    monkeypatch.setattr(tm, "_attention", local)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    w = jax.random.normal(jax.random.key(2), (8, 20, 4, 8), jnp.float32)
    for causal in (False, True):
        sharded = jax.jit(lambda w: tm.self_attend(w, causal=causal, mesh=mesh))(w)
        np.testing.assert_allclose(sharded, L.attend(w, w, w, impl="explicit", causal=causal), atol=1e-6)
    odd = w[:6, :, :3]  # a batch and heads the mesh does not divide stay whole on every device (still correct)
    np.testing.assert_allclose(jax.jit(lambda w: tm.self_attend(w, causal=False, mesh=mesh))(odd), _explicit(odd), atol=1e-6)


def test_mssa_uses_the_kernel_only_on_tpu_for_sequences_it_holds_whole():
    assert tm.worth_it(197, False) and tm.worth_it(785, False) and tm.worth_it(1024, True)
    assert not tm.worth_it(1025, True) and not tm.worth_it(2048, False)
    cpu_mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
    w = jax.random.normal(jax.random.key(3), (2, 5, 2, 4), jnp.float32)
    with act_sharding.activation_mesh(cpu_mesh):  # CPU: the explicit form, same numbers
        np.testing.assert_allclose(L.self_attend(w, impl="fused"), _explicit(w), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'crate_jax[aot]')")
def test_compiled_for_a_tpu_slice_the_kernel_runs_per_chip_and_is_costed():
    """With libtpu (compile-only): MSSA's fused attention of 197-token sequences on a 4-chip v5e slice compiles to
    one forward and one backward kernel on each chip's quarter of the batch, in the `[B, T, K·p]` layout the
    projection writes (no padding, no transposes), and the breakdown counts their matmuls (2 and 4 per head)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from crate_jax import aot
    from crate_jax.parallel import hlo_cost

    devices = aot.tpu_devices(aot.parse_topology("v5e-4"))
    mesh = Mesh(np.array(devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"))

    def loss(w):
        with act_sharding.activation_mesh(mesh):
            return jnp.sum(L.self_attend(w, impl="fused").astype(jnp.float32) ** 2)

    b, t, k, p = 16, 197, 12, 64
    w = jax.ShapeDtypeStruct((b, t, k, p), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    text = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    calls = {c.name.split(".")[0]: c for c in hlo_cost.Breakdown.of(text).charges if c.opcode == "custom-call"}
    assert set(calls) == {"mssa_fwd", "mssa_bwd"}
    pairs = (b // 4) * k * t * t * p  # per chip
    assert (calls["mssa_fwd"].flops, calls["mssa_bwd"].flops) == (2 * 2 * pairs, 2 * 4 * pairs)
    assert "bf16[4,197,768]" in text


def test_a_scanned_model_through_the_kernel_equals_explicit_attention(monkeypatch):
    """The whole path inside a model: MSSA -> `layers.self_attend` -> the kernel (run by the TPU interpreter,
    `on_tpu` forced) in a scanned stack; logits and every parameter's gradient match the model with explicit
    attention. (Remat is left out: the interpreter's callbacks cannot be rematerialised; the compiled kernel
    can, and the libtpu plans compile it under full remat.)"""
    from flax import nnx

    from crate_jax.models import build_model, model_config, tpu_attention

    cfg = model_config("crate_alpha", "Ti/8", image_size=32, patch_size=8, depth=2,
                       num_classes=5, scan=True, remat="none")
    fused, explicit = build_model(cfg, 0), build_model(cfg.replace(attention="explicit"), 0)
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    loss = lambda m: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    monkeypatch.setattr(tpu_attention, "on_tpu", lambda mesh: True)
    with pltpu.force_tpu_interpret_mode():
        out, grads = fused(x), nnx.grad(loss)(fused)
    np.testing.assert_allclose(out, explicit(x), atol=2e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(nnx.grad(loss)(explicit))):
        np.testing.assert_allclose(g, e, atol=2e-5)
