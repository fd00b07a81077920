"""CLIPA two-tower training: the global-batch loss, official-layout import, text tower options,
position-embedding interpolation, the recipe config, and the real config shrunk end to end."""

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

import reference_np as R
from crate_jax.configs import clipa
from crate_jax.checkpoint.bundle import load_bundle, save_bundle
from crate_jax.clip import loss as L, zeroshot as Z
from crate_jax.models import masking, text as T, two_tower as TT
from crate_jax.weights import clipa as convert_clipa
from crate_jax.clip.task import ClipTask, two_tower_config_from
from crate_jax.errors import ConfigError
from crate_jax.parallel.mesh import make_mesh
from crate_jax.train.evaluation import EvalState
from crate_jax.train.loop import train_and_evaluate
from crate_jax.train.setup import Setup

TOL = 1e-5


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(B=32, E=8, seed=0):
    rng = np.random.default_rng(seed)
    zi = unit(rng.standard_normal((B, E)))
    return zi, unit(zi + 0.7 * rng.standard_normal((B, E)))


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------
def test_loss_matches_reference_on_one_device():
    zi, zt = embeddings()
    t = 1 / 0.07
    for mesh in (None, make_mesh({"data": 1, "num_devices": 1})):
        loss, m = L.contrastive_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), t, mesh=mesh)
        assert abs(float(loss) - R.contrastive_loss(zi, zt, t)) <= TOL * R.contrastive_loss(zi, zt, t)
        logits = zi @ zt.T
        assert float(m["i2t_top1"]) == pytest.approx(np.mean(logits.argmax(1) == np.arange(len(zi))))
        assert float(m["t2i_top1"]) == pytest.approx(np.mean(logits.argmax(0) == np.arange(len(zi))))
        sl, _ = L.sigmoid_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), 10.0, -5.0, mesh=mesh)
        ref = R.sigmoid_loss(zi, zt, 10.0, -5.0)
        assert abs(float(sl) - ref) <= TOL * ref


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8}])
def test_loss_over_global_batch_on_8_devices(shape):
    mesh = make_mesh(shape)
    B, E, t = 32, 8, 1 / 0.07
    zi, zt = embeddings(B, E, seed=1)
    sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    a, b = (jax.device_put(jnp.asarray(x, jnp.float32), sh) for x in (zi, zt))

    f = jax.jit(lambda a, b: L.contrastive_loss(a, b, t, mesh=mesh)[0])
    assert abs(float(f(a, b)) - R.contrastive_loss(zi, zt, t)) <= TOL * R.contrastive_loss(zi, zt, t)
    fs = jax.jit(lambda a, b: L.sigmoid_loss(a, b, 10.0, -5.0, mesh=mesh)[0])
    assert abs(float(fs(a, b)) - R.sigmoid_loss(zi, zt, 10.0, -5.0)) <= TOL * R.sigmoid_loss(zi, zt, 10.0, -5.0)

    # gradients of both towers equal those of the unsharded full-batch loss
    g = jax.jit(jax.grad(lambda a, b: L.contrastive_loss(a, b, t, mesh=mesh)[0], argnums=(0, 1)))(a, b)
    g0 = jax.grad(lambda a, b: L.contrastive_loss(a, b, t)[0], argnums=(0, 1))(jnp.asarray(zi, jnp.float32),
                                                                              jnp.asarray(zt, jnp.float32))
    for x, y in zip(g, g0):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)

    # memory-aware: each device builds [B/n, B] logits, never the full [B, B] matrix
    hlo = f.lower(a, b).compile().as_text()
    n = shape.get("data", 1) * shape.get("fsdp", 1)
    assert f"f32[{B // n},{B}]" in hlo
    assert not re.search(rf"f32\[{B},{B}\]", hlo)


# ------------------------------------------------------------------------------------------------
# Models: official layout, text options, counts
# ------------------------------------------------------------------------------------------------
SMALL = dict(img_dim=32, img_depth=2, img_heads=4, patch=8, image_size=32, out_dim=16, txt_dim=24, txt_depth=2,
             txt_heads=3, txt_mlp=48, vocab=50, txt_len=8)


def model_from(cfg, params):
    abstract = nnx.eval_shape(lambda: TT.build_two_tower(cfg, 0))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def test_imported_clipa_towers_match_reference(tmp_path):
    tree = {k: np.asarray(v, np.float32) for k, v in R.random_clipa_two_tower(0, **SMALL).items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    tok = rng.integers(0, 50, (3, 8)).astype(np.int32)
    ref_i, ref_t, ref_scale = R.clipa_embeddings({k: v.astype(np.float64) for k, v in tree.items()}, x, tok,
                                                 img_patch=8, img_heads=4, txt_heads=3)

    np.savez(tmp_path / "clipa.npz", **{f"params/{k}": v for k, v in tree.items()}, **{"opt/x": np.zeros(2)})
    from crate_jax import convert
    assert convert.main(["--format", "clipa-jax", "--input", str(tmp_path / "clipa.npz"),
                         "--output", str(tmp_path / "bundle")]) == 0
    cfg, model = load_bundle(tmp_path / "bundle")
    assert isinstance(cfg, TT.TwoTowerConfig) and cfg.text.pool == "last" and not cfg.text.pad_mask
    assert not cfg.image.stem_bias and not cfg.image.head_bias and cfg.out_dim == 16
    zi, zt, lp = nnx.jit(lambda m, x, t: m(x, t))(model, jnp.asarray(x), jnp.asarray(tok))
    for ours, ref in ((zi, ref_i), (zt, ref_t)):
        ours = np.asarray(ours, np.float64)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= TOL
        assert np.max(np.abs(ours - ref)) <= TOL
    assert abs(float(lp["t"]) - ref_scale) <= TOL * ref_scale
    # and back to the official layout bit for bit
    cfg2, params = convert_clipa.from_clipa(tree)
    back = convert_clipa.to_clipa(cfg2, params)
    assert set(back) == set(tree) and all(np.array_equal(back[k], tree[k]) for k in tree)


def test_import_names_every_bad_tensor():
    tree = {k: np.asarray(v, np.float32) for k, v in R.random_clipa_two_tower(0, **SMALL).items()}
    del tree["txt/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"]
    tree["txt/encoder_norm/scale"] = np.ones(5, np.float32)
    with pytest.raises(Exception, match=r"(?s)missing txt/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias.*"
                                        r"txt/encoder_norm/scale: expected \(24,\), got \(5,\)"):
        convert_clipa.from_clipa(tree)


def tiny_text(**kw):
    return T.text_config("mu", width=16, depth=2, num_heads=2, mlp_dim=32, vocab_size=128, max_len=6, **kw)


class text_tower:
    """A tiny text tower, called jitted: `text_tower(**cfg)(tokens) -> [B, 8]` as numpy."""

    def __init__(self, seed=0, **kw):
        self.module = T.TextTower(tiny_text(**kw), 8, rngs=nnx.Rngs(params=jax.random.key(seed)))
        self._fn = nnx.jit(lambda m, tok: m(tok))

    def __call__(self, tokens):
        out = np.asarray(self._fn(self.module, tokens))
        assert np.all(np.isfinite(out))
        return out


def test_text_tower_masks_and_pooling():
    tok = jnp.array([[101, 7, 9, 0, 0, 0], [101, 5, 6, 7, 8, 9]], jnp.int32)
    # pad mask: with [CLS] pooling, what sits at the padding positions cannot matter
    tower = text_tower(pad_mask=True, pool="cls")
    a = tower(tok)
    pos = tower.module.pos_embedding
    noise = jax.random.normal(jax.random.key(7), (1, 3, 16))  # not a constant shift: LayerNorm removes those
    pos[...] = pos[...].at[:, 3:].add(noise)
    b = tower(tok)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not np.allclose(a[1], b[1], atol=1e-3)  # row 1 has no padding
    tower(jnp.zeros((1, 6), jnp.int32))  # an all-padding row stays finite under the mask
    # causal: the first position sees only itself
    tower = text_tower(causal=True, pool="cls")
    changed = tok.at[:, 1:].set(3)
    np.testing.assert_allclose(tower(tok), tower(changed), atol=1e-6)
    # without any mask (the official tower) the last position sees every token
    tower = text_tower(pool="last")
    assert not np.allclose(tower(tok), tower(tok.at[:, 1].set(3)), atol=1e-3)
    # eos pooling = the last non-pad token; equals 'last' on a row without padding
    eos = text_tower(pad_mask=True, causal=True, pool="eos")(tok)
    last = text_tower(pad_mask=True, causal=True, pool="last")(tok)
    np.testing.assert_allclose(eos[1], last[1], atol=1e-6)
    assert not np.allclose(eos[0], last[0], atol=1e-3)


@pytest.mark.parametrize("text_model", ["crate", "crate_alpha"])
def test_white_box_text_tower(text_model):
    tower = text_tower(model=text_model)
    z = tower(jnp.array([[101, 3, 4, 0, 0, 0], [101, 5, 0, 0, 0, 0]], jnp.int32))
    assert z.shape == (2, 8) and not np.allclose(z[0], z[1], atol=1e-3)
    blocks = nnx.to_pure_dict(nnx.state(tower.module, nnx.Param))["encoder"]["blocks"]
    assert ("ista" if text_model == "crate" else "odl") in blocks and "mssa" in blocks


def test_parameter_counts_match_spec():
    def count(image_variant, res):
        cfg = TT.two_tower_config("crate_alpha", image_variant, image_size=res, text=T.text_config("H"))
        tree = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: TT.build_two_tower(cfg, 0)), nnx.Param))
        n = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
        return n(tree["img"]), n(tree["txt"]), n(tree)
    assert count("L/14", 84) == (253_448_192, 336_160_768, 589_608_961)  # docs/math.md §CLIPA table
    assert count("H/14", 224) == (526_848_000, 336_160_768, 863_008_769)


def test_config_round_trip_and_patch_dropping():
    cfg = TT.two_tower_config("crate_alpha", "Ti/8", image_size=32, out_dim=8, text=tiny_text(), mask_ratio=0.5,
                              image_overrides=dict(width=32, depth=1, num_heads=2))
    assert TT.TwoTowerConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="out_dim"):
        cfg.replace(out_dim=9)
    x = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
    kept = masking.drop_patches(x, 0.5, jax.random.key(0))
    assert kept.shape == (2, 9, 3)
    np.testing.assert_array_equal(kept[:, 0], x[:, 0])  # cls kept
    for b in range(2):  # a sorted subset of the patches
        rows = [int(r) for r in np.asarray(kept[b, 1:, 0] - x[b, 0, 0]) // 3]
        assert rows == sorted(rows) and len(set(rows)) == 8 and min(rows) >= 1
    model = TT.build_two_tower(cfg, 0)
    z = nnx.jit(lambda m, x: m.encode_image(x, train=True, rng=jax.random.key(1)))(model, jnp.zeros((2, 32, 32, 3)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-5)


def test_recall_at_k_counts_ranks_and_ties():
    zimg = np.eye(4)
    ztxt = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0.5, 1, 0], [0, 0, 0, 1.0]])
    r = Z.recall_at_k(zimg, ztxt, ks=(1, 2))
    # image -> captions: image 0 ties caption 1 (rank 1), image 1 scores 0 for its caption and 0.5 for
    # caption 2 (rank 3: ties count against it), images 2 and 3 rank first
    assert (r["i2t_r1"], r["i2t_r2"]) == (0.5, 0.75)
    # caption -> images: caption 1 scores 0 on its image and 1 on image 0 (rank 3), the others rank first
    assert (r["t2i_r1"], r["t2i_r2"]) == (0.75, 0.75)
    assert Z.load_templates("imagenet_templates.txt")[0] == "a bad photo of a {}."
    assert len(Z.load_classnames("imagenet_classnames.txt")) == 1000


# ------------------------------------------------------------------------------------------------
# Recipe config and position-embedding interpolation
# ------------------------------------------------------------------------------------------------
def test_recipe_defaults_follow_spec():
    pre, ft = clipa.get_config(""), clipa.get_config("stage=finetune")
    assert (pre.batch_size, pre.total_steps, pre.res, pre.txt_len) == (32_768, 78_196, 84, 32)
    assert (pre.optim.lr, pre.optim.warmup_steps, pre.optim.wd, pre.optim.b2, pre.optim.clip) == \
        (1.024e-3, 1_600, 0.2, 0.95, 1.0)
    assert pre.optim.mu_dtype == "bfloat16" and list(pre.optim.freeze) == ["t", "txt/.*"]
    assert pre.init.dont_load == r"img/.*"
    assert (ft.batch_size, ft.total_steps, ft.res, ft.optim.lr, ft.optim.warmup_steps) == \
        (32_768, 15_639, 224, 5.12e-5, 800)
    assert ft.init.dont_load is None and ft.init.posemb_resample == "1d"
    cfg = two_tower_config_from(pre)
    assert (cfg.image.variant, cfg.image.grid, cfg.text.variant, cfg.text.max_len, cfg.out_dim) == \
        ("L/14", 6, "H", 32, 1024)
    assert two_tower_config_from(clipa.get_config("variant=H/14,stage=finetune")).image.num_patches == 256


@pytest.mark.parametrize("arg, pod", [
    ("variant=B/16", True), ("variant=L/14", True), ("variant=H/14,stage=finetune", True),
    ("variant=B/16,width=64,depth=2,heads=2", False), ("variant=B/16,depth=2", False), ("variant=S/16", False)])
def test_named_pod_towers_compute_in_bfloat16_and_scan(arg, pod):
    c = clipa.get_config(arg)
    want = ("bfloat16" if pod else "float32", pod)
    assert (c.model.image.dtype, c.model.image.scan) == want and c.model.text.dtype == want[0]
    if not pod:  # a hand-sized tower gets no pod layout: every device on fsdp, no remat
        assert (c.mesh.fsdp, c.model.image.remat) == (-1, "none")


def make_synth(tmp_path, vocab=True):
    from crate_jax.data.image_text import synth_scenes
    from crate_jax.text.tokenizer import build_vocab_file
    data = tmp_path / "synth"
    synth_scenes.generate(data, train_samples=128, eval_samples=32, samples_per_shard=64, image_size=32)
    if vocab:
        build_vocab_file(data / "captions.txt", data / "vocab.txt", 200)
    return data


def test_synth_config_without_vocab_says_how_to_build_it(tmp_path):
    data = make_synth(tmp_path, vocab=False)
    with pytest.raises(ValueError, match=r"vocab .*vocab\.txt not found.* python -m crate_jax\.text\.tokenizer "
                                         r"--corpus \S*captions\.txt --out \S*vocab\.txt --size 500"):
        clipa.get_config(tiny_args(data))


def tiny_args(data, **kw):
    a = dict(synth=data, variant="Ti/8", width=32, depth=1, heads=2, out_dim=16, text="mu", txt_len=8, res=16,
             steps=4, batch=16, lr=1e-3, warmup=1, freeze_text=False, log_every=1, eval_every=4, eval_batch=16)
    a.update(kw)
    return ",".join(f"{k}={v}" for k, v in a.items())


def tiny_config(data, mesh=None, **kw):
    c = clipa.get_config(tiny_args(data, **kw))
    c.mesh = mesh or {"data": 2, "fsdp": 2, "tensor": 2}
    c.checkpoint_every = 2
    c.async_checkpoints = False
    c.data.num_threads = 1
    c.data.shuffle_buffer = 64
    return c


def no_evals(c):
    c.evals = ConfigDict()
    return c


def rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def initial_params(config):
    """The parameters a run of `config` starts from (fresh, or merged from `config.init`)."""
    return jax.tree.map(np.asarray, Setup(config, make_mesh(config.mesh)).fresh_state()["params"])


@pytest.mark.slow
def test_posemb_interpolation_modes(tmp_path):
    """Fine-tuning init: 1-D (CLIPA) and 2-D resampling of img/pos_embedding as documented (docs/math.md §Position tables),
    a text pos of another length resampled along its axis, `dont_load` keeping fresh values."""
    data = make_synth(tmp_path)
    one_device = {"data": 1, "num_devices": 1}
    low_cfg = tiny_config(data, mesh=one_device, res=16, txt_len=8)  # 2x2 grid + cls = 5 rows
    low_cfg.seed = 3  # unlike the fresh init (seed 0) of the models initialised from it
    params = initial_params(low_cfg)
    save_bundle(tmp_path / "low", ClipTask(low_cfg).model_cfg, params)
    pos = params["img"]["pos_embedding"]

    def init(**kw):
        return initial_params(tiny_config(data, mesh=one_device, stage="finetune", init=str(tmp_path / "low"), **kw))

    one = init(res=32, txt_len=12)  # 4x4 grid + cls = 17 rows; 12 text positions
    np.testing.assert_allclose(one["img"]["pos_embedding"], R.resample_posemb_1d(pos, 17), atol=1e-6)
    np.testing.assert_allclose(one["txt"]["pos_embedding"], R.resample_posemb_1d(params["txt"]["pos_embedding"], 12),
                               atol=1e-6)
    D = lambda tree: tree["img"]["encoder"]["blocks"]["odl"]["D"]
    np.testing.assert_array_equal(D(one), D(params))
    np.testing.assert_array_equal(one["t"], params["t"])
    two = init(res=32, txt_len=8, posemb="2d")
    np.testing.assert_allclose(two["img"]["pos_embedding"], R.resample_posemb_2d(pos, 4, 4), atol=1e-6)
    assert not np.allclose(one["img"]["pos_embedding"], two["img"]["pos_embedding"], atol=1e-3)
    # pre-training stage: the image tower stays fresh, text and t come from the checkpoint
    got = initial_params(tiny_config(data, mesh=one_device, init=str(tmp_path / "low"), freeze_text=True))
    np.testing.assert_array_equal(got["txt"]["embed"]["embedding"], params["txt"]["embed"]["embedding"])
    assert not np.allclose(got["img"]["pos_embedding"], pos)
    # a frozen text tower with nothing to load would train against random text features
    with pytest.raises(ConfigError, match="init"):
        Setup(tiny_config(data, mesh=one_device, freeze_text=True), make_mesh(one_device))


def test_train_data_from_tfds_directory(tmp_path):
    """`tfds=DIR` reads CLIPA's TFDS layout (jpg/txt) instead of shards, tokenised, and resumes exactly."""
    from crate_jax.data.image_text import arrayrecord_convert
    data = make_synth(tmp_path)
    arrayrecord_convert.convert(str(data / "train" / "{00000..00001}.tar"), tmp_path / "tfds")
    c = tiny_config(data, tfds=str(tmp_path / "tfds"))
    c.data.tfds_split = "train"
    task = ClipTask(c)
    it = task.train_iterator(batch_size=16, process_index=0, process_count=1)
    first = next(it)
    assert first["image"].shape == (16, 16, 16, 3) and first["image"].dtype == np.uint8
    assert first["text"].shape == (16, 8) and (first["text"][:, 0] == task.tokenizer.cls_id).all()
    state = it.get_state()
    b2 = next(it)
    it2 = task.train_iterator(batch_size=16, process_index=0, process_count=1)
    it2.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(it2)["text"], b2["text"])


def test_imagenet_zero_shot_through_tfds(tmp_path):
    """The ImageNet zero-shot path (TFDS `imagenet2012` validation, shipped class names), on TFDS's
    mock data; and a missing dataset with `skip_if_missing` is skipped, not fatal."""
    import tensorflow_datasets as tfds
    data = make_synth(tmp_path)
    (tmp_path / "one_template.txt").write_text("a photo of a {}.\n")
    c = tiny_config(data, eval_batch=32)
    spec = dict(source="tfds", name="imagenet2012", data_dir=None, split="validation", decoder="tfds",
                classnames="imagenet_classnames.txt", templates=str(tmp_path / "one_template.txt"))
    c.evals = ConfigDict({"imagenet": dict(spec, type="zeroshot"),
                          "missing": dict(spec, type="zeroshot", data_dir=str(tmp_path / "nothing"),
                                          skip_if_missing=True)})
    setup = Setup(c, make_mesh(c.mesh))
    state = EvalState.of(0, setup.fresh_state(), setup.graphdef, setup.mesh)
    with tfds.testing.mock_data(num_examples=40):
        out = {ev.name: ev.run(state) for ev in setup.evaluators}
    assert out["missing"] == {} and sorted(out["imagenet"]) == ["count", "top1", "top5"]
    assert out["imagenet"]["count"] == 40 and 0.0 <= out["imagenet"]["top1"] <= out["imagenet"]["top5"] <= 1.0


@pytest.mark.slow
def test_real_config_trains_resumes_and_evaluates(tmp_path):
    data = make_synth(tmp_path)
    wd = tmp_path / "pre"
    train_and_evaluate(tiny_config(data), wd)
    first = rows(wd)
    losses = {r["step"]: r["train/loss"] for r in first if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    final = first[-1]
    for key in ("eval/synth/top1", "eval/synth/top5", "eval/synth_retrieval/i2t_r1", "eval/synth_retrieval/t2i_r10"):
        assert key in final and 0.0 <= final[key] <= 1.0
    assert final["eval/synth/count"] == 32 and final["eval/synth_retrieval/count"] == 32

    # resume from step 2 (drop the step-4 checkpoint): steps 3 and 4 are recomputed exactly, and
    # metrics.jsonl holds each step once
    shutil.rmtree(wd / "checkpoints" / "4")
    train_and_evaluate(no_evals(tiny_config(data)), wd)
    again = [r for r in rows(wd) if "train/loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for r in again:
        assert r["train/loss"] == pytest.approx(losses[r["step"]], rel=1e-5)



@pytest.mark.slow
def test_finetune_stage_keeps_text_tower_and_temperature_frozen(tmp_path):
    """The recipe's fine-tuning stage (docs/clipa.md §Recipes): 2x resolution from a low-resolution two-tower
    checkpoint, text tower and t frozen (`optim.freeze`), image tower trained."""
    data = make_synth(tmp_path)
    low_cfg = tiny_config(data, mesh={"data": 1, "num_devices": 1}, res=16)
    low_cfg.seed = 3
    save_bundle(tmp_path / "low", ClipTask(low_cfg).model_cfg, initial_params(low_cfg))
    ft = tmp_path / "ft"
    cfg = no_evals(tiny_config(data, stage="finetune", res=32, steps=2, init=str(tmp_path / "low"), freeze_text=True))
    assert list(cfg.optim.freeze) == ["t", "txt/.*"]
    train_and_evaluate(cfg, ft)
    from crate_jax.checkpoint.params import read_params
    before, after = read_params(tmp_path / "low"), read_params(ft)
    assert after["img"]["pos_embedding"].shape == (1, 17, 32)
    jax.tree.map(np.testing.assert_array_equal, before["txt"], after["txt"])
    np.testing.assert_array_equal(before["t"], after["t"])
    D = lambda tree: tree["img"]["encoder"]["blocks"]["odl"]["D"]
    assert not np.allclose(D(before), D(after))
