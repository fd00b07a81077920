"""CRATE-MAE through the engine: configs/mae.py, shrunk, trains on 2 simulated devices, checkpoints (with its
fixed tables as buffers, sharded by their logical axes), crashes and resumes; k-NN reads the encoder; the run exports as a bundle that `reconstruct` renders and that initialises a CRATE classifier."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crate_jax.configs import mae
from crate_jax.checkpoint.training import TrainCheckpointer
from crate_jax.models.mae import mae_sincos_2d
from crate_jax.parallel.mesh import make_mesh
from crate_jax.ssl.mae_task import MAETask
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.setup import Setup
from ssl_helpers import CrashAfter, compile_cache  # noqa: F401 (a fixture)

STEPS = 3


def shrunk():
    """configs/mae.py itself, shrunk: width 32, depth 1 encoder / decoder, 16 px digits in 4 px patches."""
    c = mae.get_config(f"variant=T/4,res=16,batch=16,steps={STEPS},source=digits")
    c.model.update(width=32, depth=1, num_heads=2)
    c.mesh.update(data=2, fsdp=1, tensor=1, num_devices=2)  # (the 8-device sharded state: test_simdino_task)
    c.update(log_every=1, checkpoint_every=1, keep_checkpoints=5, async_checkpoints=False)
    c.evals = {"knn": dict(type="knn", batch_size=512, data=dict(augment="none"))}
    c.data.update(num_threads=2)
    return c


def test_shrunk_config_trains_checkpoints_resumes(tmp_path, monkeypatch, compile_cache):  # noqa: F811
    cfg = shrunk()
    setup = Setup(cfg, make_mesh(cfg.mesh))
    assert set(setup.state_sh["buffers"]) == {"pos_embed", "decoder_pos_embed"}  # fixed tables: buffers
    wide = shrunk()
    wide.mesh = dict(data=4, fsdp=2, tensor=1)  # the same state on 8 devices: the tables' embed axis over fsdp
    assert tuple(Setup(wide, make_mesh(wide.mesh)).state_sh["buffers"]["pos_embed"].spec) == (None, None, "fsdp")
    original = MAETask.train_iterator
    monkeypatch.setattr(MAETask, "train_iterator", lambda self, **kw: CrashAfter(original(self, **kw), 2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(cfg, tmp_path / "run")
    monkeypatch.undo()
    out = train_and_evaluate(cfg, tmp_path / "run")  # resumes from step 2
    assert out["eval/knn/top1"] > 0.2 and out["train/removed_fraction"] == 0.75
    ck = TrainCheckpointer(tmp_path / "run" / "checkpoints", async_save=False)
    try:
        assert ck.all_steps()[-1] == STEPS
        args = ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state))
        a = jax.tree.map(np.asarray, ck.manager.restore(STEPS, args=args)["state"])
    finally:
        ck.close()
    np.testing.assert_allclose(a["buffers"]["decoder_pos_embed"][0], mae_sincos_2d(4, 32), atol=1e-7)

    # a bundle, PNG reconstructions, and a CRATE classifier initialised from the encoder
    from crate_jax import reconstruct
    from crate_jax.models import build_model, model_config
    from crate_jax.checkpoint.bundle import params_dict
    from crate_jax.ssl.bundles import export_run
    from crate_jax.train.pretrained import load_pretrained
    from ml_collections import ConfigDict
    bundle = export_run(tmp_path / "run", tmp_path / "mae_bundle")
    assert reconstruct.main(["--checkpoint", str(bundle), "--images", "digits", "--out", str(tmp_path / "png"),
                             "--max-images", "2"]) == 0
    assert (tmp_path / "png" / "reconstructions.png").is_file()
    assert len(list((tmp_path / "png").glob("*_reconstruction.png"))) == 2
    clf = model_config("crate", "T/4", image_size=16, num_classes=10, width=32, depth=1, num_heads=2, lmbda=0.5,
                       final_ln_eps=1e-6)
    fresh = jax.tree.map(np.asarray, jax.jit(lambda: params_dict(build_model(clf, 1)))())
    init = load_pretrained(ConfigDict(dict(checkpoint=str(bundle), dont_load=r"head/.*")), fresh, target=clf)
    mp = a["params"]
    np.testing.assert_array_equal(init["encoder"]["blocks"]["ista"]["D"], mp["encoder"]["blocks"]["ista"]["D"])
    np.testing.assert_array_equal(init["embedding"]["kernel"], mp["patch_embed"]["kernel"].reshape(48, 32))
    np.testing.assert_array_equal(init["encoder_norm"]["scale"], mp["norm"]["scale"])
    np.testing.assert_allclose(init["pos_embedding"][0], mae_sincos_2d(4, 32))
    np.testing.assert_array_equal(init["patch_norm"]["scale"], 1.0)  # no MAE counterpart: fresh
    with pytest.raises(ValueError, match=r"config.model.lmbda=0.1 \(the CRATE-MAE encoder has lmbda=0.5\)"):
        load_pretrained(ConfigDict(dict(checkpoint=str(bundle), dont_load=r"head/.*")), fresh,
                        target=clf.replace(lmbda=0.1))
