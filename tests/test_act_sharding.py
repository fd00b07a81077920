"""Activation sharding between and inside blocks (crate_jax.models.act_sharding): the batch over data / fsdp,
the tokens over tensor (sequence parallelism) where they divide, and a sequence-parallel CRATE-α language model
on 8 simulated devices that gives the unsharded values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from crate_jax.models.act_sharding import activation_mesh, constrain, constrain_tokens
from crate_jax.models.lm import build_lm, lm_config
from crate_jax.parallel.mesh import make_mesh


def spec_of(fn, x, mesh):
    with activation_mesh(mesh):
        out = jax.jit(fn)(x)
    return tuple(out.sharding.spec) + (None,) * (x.ndim - len(out.sharding.spec))


def test_specs_batch_over_data_fsdp_tokens_over_tensor_where_they_divide():
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=4))
    x = jnp.zeros((4, 8, 16))
    assert spec_of(lambda a: constrain(a, seq_dim=1), x, mesh) == ("data", "tensor", None)
    assert spec_of(lambda a: constrain(a), x, mesh)[:2] == ("data", None)  # no seq_dim: tokens whole
    assert spec_of(lambda a: constrain_tokens(a), x, mesh) == ("data", "tensor", None)
    odd = jnp.zeros((3, 6, 16))  # neither 3 sequences over 2 nor 6 tokens over 4 divide: nothing is forced
    assert constrain(odd, seq_dim=1) is odd
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
    x = jnp.zeros((8, 8, 16))
    assert spec_of(lambda a: constrain(a, seq_dim=1), x, mesh) == (("data", "fsdp"), None, None)
    with activation_mesh(mesh):
        assert constrain_tokens(x) is x  # without a tensor axis a block's residual is left to propagation
    assert constrain(x, seq_dim=1) is x  # outside a step's mesh: unchanged


def test_sequence_parallel_lm_equals_unsharded(remat="dots"):
    cfg = lm_config("crate_alpha", "S", vocab_size=64, block_size=16, width=32, depth=2, num_heads=4, scan=True,
                    remat=remat)
    model = build_lm(cfg, 0)
    graphdef, params = nnx.split(model)
    x = np.random.default_rng(0).integers(0, 64, (4, 16))

    def loss(p, t):
        logits = nnx.merge(graphdef, p)(t)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]), logits

    ref_val, ref_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=4))
    with activation_mesh(mesh):  # compiled once: its values and its program text
        f = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, x).compile()
    (val, logits), grad = f(params, x)
    text = f.as_text()
    np.testing.assert_allclose(val, ref_val[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_val[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the residual stream between blocks is per chip [2 sequences, 4 of the 16 tokens, 32]
    assert "f32[2,4,32]" in text
