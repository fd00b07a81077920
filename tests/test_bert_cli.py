"""CRATE-BERT and BERT through the command lines: `convert --format crate-bert-hf / bert-hf / roberta-hf` ->
`predict --tokens --attention-mask --token-types` (parity <= 1e-5 with the float64 references, padding in the
inputs) -> `export` (bit-exact round trip); every bad key in one error and nothing written; the pinned
parameter counts; a too-long input is a clear error."""

import numpy as np
import pytest

import reference_bert_np as R
from crate_jax import convert, export, predict
from crate_jax.models import bert as B
from crate_jax.weights import bert as W
from crate_jax.weights.readers import read_tensors

V, P, DIM, DEPTH, HEADS, MLP = 60, 24, 32, 2, 4, 48


def _inputs(rng, pad: int, n=3, t=14):
    ids = rng.integers(3, V, (n, t))
    ids[0, 9:] = pad  # a padded row: pad tokens at the end, masked out of the keys
    ids[1, 12:] = pad
    mask = (ids != pad).astype(np.int32)
    types = np.zeros_like(ids)
    types[:, 7:] = 1
    return ids, mask, types


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _save(path, sd):
    from safetensors.numpy import save_file
    save_file({k: np.asarray(v, np.float32) for k, v in sd.items()}, str(path))


def _predict(tmp_path, bundle, ids, mask, types):
    for name, a in (("ids", ids), ("m", mask), ("tt", types)):
        np.save(tmp_path / f"{name}.npy", a)
    assert predict.main(["--checkpoint", str(bundle), "--tokens", str(tmp_path / "ids.npy"), "--attention-mask",
                         str(tmp_path / "m.npy"), "--token-types", str(tmp_path / "tt.npy"), "--output",
                         str(tmp_path / "logits.npy"), "--batch-size", "2"]) == 0
    return np.load(tmp_path / "logits.npy")


@pytest.mark.parametrize("tied", [True, False])
def test_crate_bert_convert_predict_export(tmp_path, tied):
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_crate_bert_state_dict(0, vocab=V, positions=P, dim=DIM, depth=DEPTH, tied=tied).items()}
    _save(tmp_path / "model.safetensors", sd)
    assert convert.main(["--format", "crate-bert-hf", "--input", str(tmp_path / "model.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    ids, mask, types = _inputs(np.random.default_rng(1), pad=1)
    ours = _predict(tmp_path, tmp_path / "b", ids, mask, types)
    ref = R.crate_bert_forward(sd, ids, mask, types, heads=HEADS)
    assert ours.dtype == np.float32 and ours.shape == (3, 14, V)
    assert _rel(ours, ref) <= 1e-5
    assert _rel(ours, R.crate_bert_forward(sd, ids, None, types, heads=HEADS)) > 1e-3  # the mask matters
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "crate-bert-hf", "--output",
                        str(tmp_path / "back.safetensors")]) == 0
    back = read_tensors(tmp_path / "back.safetensors")
    assert set(back) == {k for k in sd if ".decoder." not in k}  # save_pretrained omits the tied decoder
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_bare_crate_model_without_prefix_and_npz(tmp_path):
    """A bare `CrateModel` (no `crate.` prefix, with the pooler) from .npz: an encoder with a pooler and no MLM head."""
    sd = R.random_crate_bert_state_dict(2, vocab=V, positions=P, dim=DIM, depth=DEPTH, pooler=True)
    bare = {k[len("crate."):]: np.asarray(v, np.float32) for k, v in sd.items() if k.startswith("crate.")}
    np.savez(tmp_path / "bare.npz", **bare)
    cfg, params = W.import_bert("crate-bert-hf", tmp_path / "bare.npz", heads=HEADS)
    assert cfg.pooler and not cfg.mlm_head
    back = W.from_params("crate-bert-hf", params, cfg)
    assert set(back) == set(bare)
    for k in back:
        np.testing.assert_array_equal(back[k], bare[k], err_msg=k)


@pytest.mark.parametrize("flavour", ["bert", "roberta"])
def test_bert_and_roberta_importers(tmp_path, flavour):
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_bert_state_dict(3, vocab=V, positions=P, dim=DIM, depth=DEPTH, mlp=MLP, flavour=flavour).items()}
    if flavour == "bert":  # BertForPreTraining also stores the next-sentence head and the position_ids buffer
        sd["cls.seq_relationship.weight"] = np.zeros((2, DIM), np.float32)
        sd["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
        sd["bert.embeddings.position_ids"] = np.arange(P)[None].astype(np.float32)
    _save(tmp_path / "m.safetensors", sd)
    assert convert.main(["--format", f"{flavour}-hf", "--input", str(tmp_path / "m.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    pad = 1 if flavour == "roberta" else 0
    ids, mask, types = _inputs(np.random.default_rng(4), pad=pad)
    ours = _predict(tmp_path, tmp_path / "b", ids, mask, types)
    assert _rel(ours, R.bert_forward(sd, ids, mask, types, heads=HEADS, flavour=flavour)) <= 1e-5
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", f"{flavour}-hf", "--output",
                        str(tmp_path / "back.safetensors")]) == 0
    back = read_tensors(tmp_path / "back.safetensors")
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    dropped = (".decoder.", "seq_relationship", "position_ids")  # tied, next-sentence head, buffer
    assert {k for k in sd if not any(d in k for d in dropped)} == set(back)


def test_bad_keys_listed_at_once_and_nothing_written(tmp_path, capsys):
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_crate_bert_state_dict(5, vocab=V, positions=P, dim=DIM, depth=DEPTH).items()}
    del sd["crate.encoder.layer.1.output.weight"]
    sd["crate.encoder.layer.0.attention.self.qkv.weight"] = np.zeros((DIM, DIM + 1), np.float32)
    sd["crate.encoder.layer.0.surprise"] = np.zeros(3, np.float32)
    sd["lm_head.decoder.weight"] = sd["lm_head.decoder.weight"] + 1.0
    _save(tmp_path / "bad.safetensors", sd)
    out = tmp_path / "never"
    assert convert.main(["--format", "crate-bert-hf", "--input", str(tmp_path / "bad.safetensors"), "--output",
                         str(out), "--heads", str(HEADS)]) == 2
    err = capsys.readouterr().err
    for needle in ("layer.1.output.weight", "layer.0.attention.self.qkv.weight", "layer.0.surprise",
                   "lm_head.decoder.weight differs"):
        assert needle in err, needle
    assert not out.exists()
    assert convert.main(["--format", "bert-hf", "--input", str(tmp_path / "bad.safetensors"), "--output",
                         str(out)]) == 2
    assert "--format crate-bert-hf" in capsys.readouterr().err


def test_too_long_input_is_a_clear_error(tmp_path, capsys):
    sd = R.random_crate_bert_state_dict(6, vocab=V, positions=P, dim=DIM, depth=DEPTH)
    _save(tmp_path / "m.safetensors", sd)
    assert convert.main(["--format", "crate-bert-hf", "--input", str(tmp_path / "m.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    np.save(tmp_path / "long.npy", np.full((1, P - 1), 5, np.int32))  # P - pad - 1 = 22 is the limit
    assert predict.main(["--checkpoint", str(tmp_path / "b"), "--tokens", str(tmp_path / "long.npy"), "--output",
                         str(tmp_path / "o.npy")]) == 2
    assert f"limit of {P - 2}" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_parameter_counts_are_pinned():
    """bert-base-uncased's bare encoder + pooler (109,482,240) and bert-large-uncased's (335,141,888), from their
    Hugging Face configs; CRATE-BERT base / large with the MLM head (the pull request's `CrateConfig` defaults, RoBERTa
    tables: vocab 50,265, 514 positions, 2 types); counted on the built models and in closed form."""
    from flax import nnx
    from crate_jax.models import count_params
    cases = [(B.bert_config("bert", "base", mlm_head=False, pooler=True), 109_482_240),
             (B.bert_config("bert", "large", mlm_head=False, pooler=True), 335_141_888),
             (B.bert_config("crate_bert", "base"), 60_914_265),
             (B.bert_config("crate_bert", "large"), 128_699_481)]
    for cfg, n in cases:
        assert B.param_count(cfg) == n, cfg.variant
        assert count_params(nnx.eval_shape(lambda: B.build_bert(cfg))) == n


def test_analyze_tokens_on_crate_bert_excludes_padding(tmp_path):
    """`analyze --tokens` on a CRATE-BERT bundle: per-layer compression and sparsity; a right-padded row measures
    exactly as its text alone (padding out of every statistic); padding before text is refused."""
    import json
    from crate_jax import analyze
    sd = R.random_crate_bert_state_dict(7, vocab=V, positions=P, dim=DIM, depth=DEPTH)
    _save(tmp_path / "m.safetensors", sd)
    assert convert.main(["--format", "crate-bert-hf", "--input", str(tmp_path / "m.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    ids = np.random.default_rng(8).integers(3, V, (2, 16))
    padded = ids.copy()
    padded[1, 10:] = 1
    runs = {}
    for name, x in (("trimmed", ids[1:, :10]), ("padded", padded[1:]), ("both", padded)):
        np.save(tmp_path / f"{name}.npy", x)
        assert analyze.main(["--checkpoint", str(tmp_path / "b"), "--tokens", str(tmp_path / f"{name}.npy"), "--out",
                             str(tmp_path / name), "--batch-size", "2"]) == 0
        runs[name] = json.loads((tmp_path / name / "analysis.json").read_text())
    assert [r["layer"] for r in runs["both"]] == [0, 1]
    assert all(r["compression"] > 0 and 0 < r["sparsity"] <= 1 for r in runs["both"])
    for a, b in zip(runs["padded"], runs["trimmed"]):
        assert a["compression"] == pytest.approx(b["compression"], rel=1e-6)
        assert a["sparsity"] == pytest.approx(b["sparsity"], rel=1e-6)
    bad = padded.copy()
    bad[0, 3] = 1
    np.save(tmp_path / "bad.npy", bad)
    assert analyze.main(["--checkpoint", str(tmp_path / "b"), "--tokens", str(tmp_path / "bad.npy"), "--out",
                         str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("fmt,model_type", [("crate-bert-hf", "crate"), ("roberta-hf", "roberta")])
def test_hf_export_uses_the_official_layout_and_loads_back(tmp_path, fmt, model_type):
    """`export --format hf` of a masked-LM encoder writes the official Hugging Face names (the tied decoder left
    out, as `save_pretrained` does) with a `config.json` of that model type, and `crate_jax.load` reads it back
    bit for bit."""
    import json
    import jax
    import crate_jax
    from crate_jax.checkpoint.bundle import params_dict
    make = R.random_crate_bert_state_dict if fmt == "crate-bert-hf" else R.random_bert_state_dict
    kw = dict(vocab=V, positions=P, dim=DIM, depth=DEPTH)
    sd = make(0, **kw) if fmt == "crate-bert-hf" else make(0, flavour="roberta", mlp=MLP, **kw)
    _save(tmp_path / "model.safetensors", {k: np.asarray(v, np.float32) for k, v in sd.items()})
    assert convert.main(["--format", fmt, "--input", str(tmp_path / "model.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type and config["hidden_size"] == DIM and config["num_hidden_layers"] == DEPTH
    names = set(read_tensors(tmp_path / "hf" / "model.safetensors"))
    assert names == {k for k in sd if ".decoder." not in k and not k.endswith("position_ids")}
    _, a = crate_jax.load(tmp_path / "b")
    _, b = crate_jax.load(tmp_path / "hf")
    for x, y in zip(jax.tree.leaves(params_dict(a)), jax.tree.leaves(params_dict(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
