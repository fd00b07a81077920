"""The real `configs/lm.py`, shrunk, through the engine: it trains, checkpoints and evaluates on 1 device; the
same run interrupted after its first checkpoint resumes with the same command on 8 simulated devices
(data=2, fsdp=2, tensor=2, the vocabulary sharded over `tensor`) and reproduces the 1-device losses."""

import json
import shutil

import numpy as np
import pytest

from crate_jax.configs import lm
from crate_jax.data.tokens import prepare as TP
from crate_jax.models import ConfigError
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.metrics import read_metrics
from crate_jax.train.setup import Setup
from test_lm_data import documents


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_data")
    with open(d / "docs.jsonl", "w") as f:
        for t in documents(60):
            f.write(json.dumps({"text": t}) + "\n")
    TP.prepare([str(d / "docs.jsonl")], d / "prepared", train_tokenizer=300, val_fraction=0.2, seed=0,
               log=lambda m: None)
    return d / "prepared"


def shrunk(data, model="crate_gpt", **kw):
    c = lm.get_config(f"model={model},data={data},block=16,batch=8,steps=3,width=32,depth=2,heads=4,dtype=float32,"
                      f"warmup=1,eval_windows=8,eval_batch=8,log_every=1,ckpt_every=1")
    c.async_checkpoints = False
    c.keep_checkpoints = 5
    for k, v in kw.items():
        c[k] = v
    return c


def train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r}


def test_shrunk_config_resumes_on_8_devices_with_tensor_2_as_on_1_device(data, tmp_path):
    one = shrunk(data)
    one.mesh = dict(num_devices=1)
    ref = train_and_evaluate(one, tmp_path / "one")  # uninterrupted, 1 device
    assert {"eval/val/loss", "eval/val/perplexity"} <= set(ref) and ref["eval/val/tokens"] == 8 * 16
    assert "perf/tokens_per_s" in read_metrics(tmp_path / "one" / "metrics.jsonl")[-1]
    a = train_losses(tmp_path / "one")
    assert sorted(a) == [1, 2, 3] and a[3] < a[1]

    # the same run, died after step 1's checkpoint, resumed by the same command on data=2, fsdp=2, tensor=2:
    # steps 2 and 3 run sharded (vocabulary over tensor) and give the 1-device losses
    shutil.copytree(tmp_path / "one", tmp_path / "eight")
    for step in ("2", "3"):
        shutil.rmtree(tmp_path / "eight" / "checkpoints" / step)
    eight = shrunk(data, mesh=dict(data=2, fsdp=2, tensor=2))
    eight.evals = {}
    setup = Setup(eight, make_mesh(eight.mesh))
    assert tuple(setup.state_sh["params"]["embed"]["embedding"].spec) == ("tensor", "fsdp")  # 320 rows / 2
    train_and_evaluate(eight, tmp_path / "eight")
    b = train_losses(tmp_path / "eight")
    assert sorted(b) == [1, 2, 3] and b[1] == a[1]
    np.testing.assert_allclose([b[2], b[3]], [a[2], a[3]], rtol=1e-5)


def test_lm_config_errors_before_compiling(data):
    c = shrunk(data)
    c.data.dir = str(data / "missing")
    with pytest.raises(ConfigError, match="config.data.dir: .*no manifest.json"):
        Setup(c, make_mesh(c.mesh))
    c = shrunk(data)
    c.model.vocab_size = 100
    with pytest.raises(ConfigError, match="300 ids but the model's vocabulary is 100"):
        Setup(c, make_mesh(c.mesh))
    with pytest.raises(ValueError, match="unknown config argument 'blocks'"):
        lm.get_config("blocks=8")


@pytest.mark.parametrize("spec,sizes", [
    ("data", (-1, 1, 1)), ("fsdp", (1, -1, 1)), ("tensor:4", (1, -1, 4)), ("data+tensor:4", (-1, 1, 4)),
    ("data+fsdp:8+tensor:2", (-1, 8, 2)), ("fsdp:2+tensor:4", (1, 2, 4))])
def test_mesh_argument(spec, sizes):
    m = lm.get_config(f"mesh={spec}").mesh
    assert (m.data, m.fsdp, m.tensor) == sizes


@pytest.mark.parametrize("spec,msg", [("data+fsdp", "at most one axis without a size"),
                                      ("model:2", "expected data, fsdp"), ("tensor:x", "'tensor:x'")])
def test_bad_mesh_argument_is_named(spec, msg):
    with pytest.raises(ValueError, match=msg):
        lm.get_config(f"mesh={spec}")
