"""Classic DINO in the SimDINO engine (`loss=dino`): the loss against a float64 transcription of the official
`DINOLoss`, the centre's EMA, the per-epoch teacher-temperature warm-up, the weight-normalised prototype
layer, the frozen last layer, and a tiny run of `configs/simdino.py:loss=dino` through the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from crate_jax.configs import simdino
from crate_jax.errors import ConfigError
from crate_jax.ssl import dino_loss as D
from crate_jax.ssl.simdino_task import SimDINOTask
from crate_jax.train.optim import build_optimizer

STEPS = 4


def _official_loss(student, teacher, center, t_temp, s_temp=0.1, center_m=0.9):
    """`DINOLoss.forward` + `update_center` in float64: student `[V·M, K]` (views stacked), teacher `[2·M, K]`."""
    V = student.shape[0] // teacher.shape[0] * 2
    s = np.split(student / s_temp, V)
    z = (teacher - center) / t_temp
    q = np.exp(z - z.max(-1, keepdims=True))
    q = np.split(q / q.sum(-1, keepdims=True), 2)
    total, n = 0.0, 0
    for iq, qq in enumerate(q):
        for v in range(V):
            if v == iq:
                continue
            logp = s[v] - s[v].max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            total += np.sum(-qq * logp, axis=-1).mean()
            n += 1
    new_center = center * center_m + teacher.sum(0, keepdims=True) / len(teacher) * (1 - center_m)
    return total / n, new_center


def test_loss_and_center_match_the_official_definition():
    rng = np.random.default_rng(0)
    V, M, K = 4, 6, 32
    s, t = 3 * rng.standard_normal((V, M, K)), 3 * rng.standard_normal((2, M, K))
    c = rng.standard_normal((1, K))
    for temp in (0.04, 0.07):
        loss, m, batch_center = D.dino_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                            jnp.asarray(c, jnp.float32), teacher_temp=temp)
        want, want_c = _official_loss(s.reshape(V * M, K), t.reshape(2 * M, K), c, temp)
        assert float(loss) == pytest.approx(want, rel=2e-6)
        np.testing.assert_allclose(np.asarray(D.update_center(jnp.asarray(c[0], jnp.float32), batch_center)), want_c[0],
                                   rtol=1e-5, atol=1e-6)
        assert 0 < float(m["teacher_entropy"]) < np.log(K)
    g = jax.grad(lambda t_: D.dino_loss(jnp.asarray(s, jnp.float32), t_, jnp.zeros(K), teacher_temp=0.04)[0])(
        jnp.asarray(t, jnp.float32))
    assert not np.any(np.asarray(g))  # no gradient reaches the teacher


def test_teacher_temperature_warms_up_per_epoch():
    E, W, steps = 10, 4, 3  # official: np.concatenate((linspace(0.04, 0.07, W), ones(E − W) · 0.07))[epoch]
    want = np.concatenate([np.linspace(0.04, 0.07, W), np.ones(E - W) * 0.07])
    got = [float(D.teacher_temp_at(t, warmup_temp=0.04, temp=0.07, warmup_epochs=W, epoch_steps=steps))
           for t in range(E * steps)]
    np.testing.assert_allclose(got, np.repeat(want, steps), rtol=1e-6)
    assert float(D.teacher_temp_at(5, warmup_temp=0.04, temp=0.07, warmup_epochs=0, epoch_steps=3)) == \
        pytest.approx(0.07)


def shrunk(**over):
    """configs/simdino.py:loss=dino itself, shrunk: a 1-layer official-flavour ViT on 16 px digits."""
    c = simdino.get_config(f"model=vit,variant=Ti/4,batch=16,steps={STEPS},epochs=2,source=digits,global_size=16,"
                           f"local_size=8,n_local=2,loss=dino,out_dim=64,warmup_teacher_temp_epochs=2,official_vit=1")
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, head_hidden=32, head_dim=16, drop_path=0.0)
    c.mesh.update(data=1, fsdp=2, tensor=1, num_devices=2)
    c.update(log_every=1, checkpoint_every=STEPS, keep_checkpoints=2, async_checkpoints=False)
    c.evals = ConfigDict()
    c.optim.update(lr=0.02, warmup_steps=1)
    c.data.update(num_threads=2)
    c.update(over)
    return c


def test_config_and_head_shape():
    c = shrunk()
    assert c.optim.freeze_steps == [(r"head/last_layer/.*", STEPS // 2)]  # one of `epochs` = 2 parts of the run
    assert (c.loss.epoch_steps, c.loss.warmup_teacher_temp_epochs) == (2, 2)
    task = SimDINOTask(c)
    assert task.model_cfg.backbone.init == "dino" and task.model_cfg.prototypes == 64
    model = task.build_model(0)
    v = np.asarray(model.head.last_layer.v[...])
    assert v.shape == (16, 64) and model.head.last_layer.g is None  # norm_last_layer: g fixed at 1
    z = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model.head.last_layer(jnp.asarray(z))),
                               z @ (v / np.linalg.norm(v, axis=0, keepdims=True)), rtol=1e-5, atol=1e-6)
    bad = shrunk()
    bad.model.prototypes = 0
    with pytest.raises(ConfigError, match="prototypes"):
        SimDINOTask(bad)


def test_frozen_last_layer_gets_no_update_then_trains():
    params = {"head": {"last_layer": {"v": jnp.ones((2, 3))}, "w": jnp.ones(2)}}
    cfg = ConfigDict(dict(name="adamw", lr=0.1, warmup_steps=0, schedule="constant", wd=0.5, wd_mask=".*",
                          clip=3.0, clip_mode="per_param", freeze_steps=[(r"head/last_layer/.*", 2)]))
    tx, _ = build_optimizer(cfg, params, 10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
        moved.append((float(jnp.abs(upd["head"]["last_layer"]["v"]).max()), float(jnp.abs(upd["head"]["w"]).max())))
    assert moved[0][0] == moved[1][0] == 0.0 and moved[2][0] > 0  # no gradient step and no weight decay
    assert all(w > 0 for _, w in moved)


def test_tiny_dino_run_through_the_engine(tmp_path):
    from crate_jax.checkpoint.params import read_params
    from crate_jax.train.loop import train_and_evaluate
    from crate_jax.models.self_distill import build_self_distill
    from crate_jax.checkpoint.bundle import params_dict
    out = train_and_evaluate(shrunk(), tmp_path / "run")
    assert np.isfinite(out["train/loss"]) and out["train/finite"] == 1.0
    assert out["train/teacher_temp"] == pytest.approx(0.07)  # epoch 1 = the last of the 2 warm-up epochs
    extras = read_params(tmp_path / "run", subtree="extras")
    assert int(extras["step"]) == STEPS and np.abs(extras["center"]).max() > 0
    params = read_params(tmp_path / "run")
    task = SimDINOTask(shrunk())
    init = jax.tree.map(np.asarray, params_dict(build_self_distill(task.model_cfg, 0)))
    # frozen for 2 of the 4 steps, then trained; the teacher follows the student
    assert not np.allclose(params["head"]["last_layer"]["v"], init["head"]["last_layer"]["v"])
    assert not np.allclose(params["backbone"]["cls"], init["backbone"]["cls"])
    assert not np.allclose(extras["teacher"]["head"]["last_layer"]["v"], init["head"]["last_layer"]["v"])
