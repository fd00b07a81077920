"""SimDINO through the engine (the teacher sharded like the student, FSDP over 2 simulated devices): the real config (shrunk) trains, checkpoints, crashes and
resumes with the same EMA teacher as an uninterrupted run; the teacher is the EMA of the stored students with
DINO's cosine momentum; the k-NN probe reads the teacher; a teacher bundle initialises a classifier."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crate_jax.configs import simdino
from crate_jax.checkpoint.training import TrainCheckpointer
from crate_jax.parallel.mesh import make_mesh
from crate_jax.ssl.simdino_task import SimDINOTask, momentum_at
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.setup import Setup
from ssl_helpers import CrashAfter, compile_cache  # noqa: F401 (a fixture)

STEPS, CRASH = 4, 2


def shrunk():
    """configs/simdino.py itself, shrunk: a 1-layer CRATE-α on 16 px digits, 2 global + 2 local crops."""
    c = simdino.get_config(f"model=crate_alpha,variant=Ti/4,batch=16,steps={STEPS},source=digits,global_size=16,"
                           f"local_size=8,n_local=2,eps_sq=0.5")
    c.model.update(width=32, depth=1, num_heads=2, head_hidden=32, head_dim=16, drop_path=0.0)
    c.teacher.momentum = 0.9  # a teacher that visibly moves in 4 steps
    c.mesh.update(data=1, fsdp=2, tensor=1, num_devices=2)  # the teacher FSDP-sharded in the real run
    c.update(log_every=1, checkpoint_every=1, keep_checkpoints=10, async_checkpoints=False)
    c.optim.update(lr=0.02, warmup_steps=1)  # parameters (and so the teacher) that visibly move in 4 steps
    c.evals = {"knn": dict(type="knn", params="teacher", k=5, batch_size=256, data=dict(augment="none"))}
    c.data.update(num_threads=2)
    return c


def restore(setup, wd, step):
    ck = TrainCheckpointer(wd / "checkpoints", async_save=False)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state))
        return jax.tree.map(np.asarray, ck.manager.restore(step, args=args)["state"])
    finally:
        ck.close()


def test_teacher_update_is_the_cosine_momentum_ema():
    cfg = shrunk()
    task = SimDINOTask(cfg)
    task.total_steps = 10
    rng = np.random.default_rng(0)
    t, p = {"w": rng.standard_normal(5).astype(np.float32)}, {"w": rng.standard_normal(5).astype(np.float32)}
    for step, m in ((0, 0.9), (5, 0.95), (10, 1.0)):  # m_t = 1 + ½ (0.9 − 1)(1 + cos(π t / 10))
        out = task.update_extras({"teacher": t}, p, step, None)["teacher"]["w"]
        np.testing.assert_allclose(out, m * t["w"] + (1 - m) * p["w"], rtol=1e-6, atol=1e-7)
    assert float(momentum_at(2, 10, 0.996)) == pytest.approx(1 - 0.002 * (1 + np.cos(np.pi * 0.2)), rel=1e-7)


def test_shrunk_config_resumes_with_the_same_ema_teacher(tmp_path, monkeypatch, compile_cache):
    cfg = shrunk()
    wide = shrunk()
    wide.mesh = dict(data=2, fsdp=2, tensor=2)  # on 8 devices the teacher is sharded exactly like the student
    sh = Setup(wide, make_mesh(wide.mesh)).state_sh
    for part in (sh["extras"]["teacher"], sh["params"]):
        assert tuple(part["backbone"]["encoder"]["blocks"]["odl"]["D"].spec) == (None, "fsdp", "tensor")
    setup = Setup(cfg, make_mesh(cfg.mesh))
    assert tuple(setup.state_sh["extras"]["teacher"]["backbone"]["encoder"]["blocks"]["odl"]["D"].spec) == \
        (None, "fsdp", None)
    ref_cfg = shrunk()
    ref_cfg.update(evals={}, checkpoint_every=STEPS)
    train_and_evaluate(ref_cfg, tmp_path / "ref")  # uninterrupted
    got = restore(setup, tmp_path / "ref", STEPS)
    assert not np.allclose(got["extras"]["teacher"]["head"]["layers"][0]["kernel"],
                           got["params"]["head"]["layers"][0]["kernel"])  # the teacher is not the student

    cfg.checkpoint_every = CRASH  # fewer saves; the schedule and the math do not depend on it
    original = SimDINOTask.train_iterator
    monkeypatch.setattr(SimDINOTask, "train_iterator", lambda self, **kw: CrashAfter(original(self, **kw), CRASH))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(cfg, tmp_path / "crashed")
    monkeypatch.undo()
    out = train_and_evaluate(cfg, tmp_path / "crashed")  # the same command resumes from step 2
    resumed = restore(setup, tmp_path / "crashed", STEPS)
    for part in ("extras", "params"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed[part], got[part])
    assert out["eval/knn/top1"] > 0.25  # the teacher's features, 10 classes
    assert np.isfinite(out["train/rate"]) and out["train/comp"] <= 1.0
    got = got["extras"]["teacher"]

    # the teacher exports as a bundle and initialises a CRATE-α classifier: backbone kept, head fresh
    from crate_jax.ssl.bundles import export_run
    from crate_jax.train.pretrained import load_pretrained
    from ml_collections import ConfigDict
    bundle = export_run(tmp_path / "ref", tmp_path / "teacher", teacher=True)
    from crate_jax.models import build_model, model_config
    from crate_jax.checkpoint.bundle import params_dict
    clf = model_config("crate_alpha", "Ti/4", image_size=16, num_classes=10, width=32, depth=1, num_heads=2)
    fresh = jax.tree.map(np.asarray, jax.jit(lambda: params_dict(build_model(clf, 1)))())
    init = load_pretrained(ConfigDict(dict(checkpoint=str(bundle), dont_load=r"head/.*")), fresh)
    np.testing.assert_array_equal(init["encoder"]["blocks"]["odl"]["D"], got["backbone"]["encoder"]["blocks"]["odl"]["D"])
    np.testing.assert_array_equal(init["cls"], got["backbone"]["cls"])
    np.testing.assert_array_equal(init["head"]["kernel"], fresh["head"]["kernel"])


def test_per_parameter_gradient_clipping_is_dinos():
    import jax.numpy as jnp
    import optax
    from ml_collections import ConfigDict
    from crate_jax.errors import ConfigError
    from crate_jax.train.optim import build_optimizer
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}
    from crate_jax.train.optim import clip_per_parameter
    cfg = ConfigDict(dict(name="adamw", lr=1.0, warmup_steps=0, schedule="constant", clip=1.0, clip_mode="per_param"))
    tx, _ = build_optimizer(cfg, params, 10)
    assert np.isfinite(np.asarray(tx.update(grads, tx.init(params), params)[0]["a"])).all()
    out, _ = clip_per_parameter(1.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(np.asarray(out["a"]), [0.6, 0.8], rtol=1e-5)  # ‖a‖ = 5 -> 1
    np.testing.assert_allclose(np.asarray(out["b"]), [0.1])  # under the threshold: unchanged
    with pytest.raises(ConfigError, match="clip_mode"):
        build_optimizer(ConfigDict(dict(lr=1.0, warmup_steps=0, clip=1.0, clip_mode="layer")), params, 10)
