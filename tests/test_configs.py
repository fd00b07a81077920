"""Every config file loads; the real ImageNet configs, shrunk, train a step on TFDS mock data."""

import importlib
from pathlib import Path

import pytest

from crate_jax.models import ConfigError
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.setup import Setup
from train_helpers import losses

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    mod = importlib.import_module(f"crate_jax.configs.{name}")
    c = mod.get_config("")
    assert "optim" in c and "batch_size" in c


def test_config_args_are_checked():
    from crate_jax.configs import imagenet21k
    with pytest.raises(ValueError, match="unknown config argument 'varient'"):
        imagenet21k.get_config("varient=B/16")
    c = imagenet21k.get_config("variant=B/16,res=112,batch=1024")
    assert (c.model.variant, c.res, c.batch_size) == ("B/16", 112, 1024)
    assert c.optim.lr == pytest.approx(5e-5 * 1024 / 256)


@pytest.mark.parametrize("name", ["imagenet21k", "imagenet1k", "crate_imagenet1k"])
def test_real_config_shrunk_trains_one_step_on_mock_imagenet(name, tmp_path):
    import tensorflow_datasets as tfds
    mod = importlib.import_module(f"crate_jax.configs.{name}")
    c = mod.get_config("variant=Ti/16,res=32,batch=8,steps=1" if name != "crate_imagenet1k"
                       else "variant=T/16,res=32,batch=8,steps=1")
    c.model.update(depth=1)
    c.model.patch_size = 16
    c.data.update(name="imagenet2012", tfds_decoder="tfds", eval_split=None)
    c.mesh.update(num_devices=1)
    c.log_every = 1
    with tfds.testing.mock_data(num_examples=16):
        train_and_evaluate(c, tmp_path / "wd")
    assert list(losses(tmp_path / "wd")) == [1]


def test_invalid_configs_fail_before_compiling():
    from crate_jax.configs import digits
    c = digits.get_config("")
    c.res = 18
    with pytest.raises(ConfigError, match="not divisible by patch size 4"):
        Setup(c, make_mesh(c.mesh))
