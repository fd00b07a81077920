"""The language-model command lines: `convert` (crate-gpt-torch .pth, gpt2-hf .safetensors) -> `predict --tokens`
(parity with the float64 reference) -> `export` (bit-exact round trip), every bad key in one error and nothing
written, `generate` with the cache, `analyze --tokens`."""

import json

import numpy as np
import pytest

import reference_lm_np as R
from crate_jax import analyze, convert, export, generate, predict
from crate_jax.text.bpe import train_bpe
from crate_jax.weights.readers import read_tensors
from test_lm_data import documents

V, T, DIM, DEPTH, HEADS = 300, 24, 32, 2, 4


def write_pth(path, sd):
    import torch
    torch.save({"model": {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}}, path)


@pytest.fixture(scope="module")
def crate_gpt(tmp_path_factory):
    """A nanoGPT-style checkpoint of a random CRATE-GPT (wrapped as nanoGPT saves it), converted to a bundle."""
    d = tmp_path_factory.mktemp("crate_gpt")
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_crate_gpt_state_dict(0, vocab=V, block=T, dim=DIM, depth=DEPTH).items()}
    write_pth(d / "ckpt.pt", sd)
    assert convert.main(["--format", "crate-gpt-torch", "--input", str(d / "ckpt.pt"), "--output", str(d / "bundle"),
                         "--heads", str(HEADS)]) == 0
    return d, sd


def test_convert_predict_export_round_trip(crate_gpt, tmp_path):
    d, sd = crate_gpt
    x = np.random.default_rng(3).integers(0, V, (3, 20))
    np.save(tmp_path / "tokens.npy", x)
    assert predict.main(["--checkpoint", str(d / "bundle"), "--tokens", str(tmp_path / "tokens.npy"), "--output",
                         str(tmp_path / "logits.npy"), "--batch-size", "2"]) == 0
    ours, ref = np.load(tmp_path / "logits.npy"), R.crate_gpt_forward(sd, x, heads=HEADS)
    assert ours.dtype == np.float32 and ours.shape == (3, 20, V)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-5
    assert export.main(["--checkpoint", str(d / "bundle"), "--format", "crate-gpt-torch", "--output",
                        str(tmp_path / "back.pth")]) == 0
    back = read_tensors(tmp_path / "back.pth")
    assert set(back) == set(sd)  # incl. the tied lm_head.weight and the causal-mask buffers
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_gpt2_hf_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file
    sd = {k: np.asarray(v, np.float32) for k, v in
          R.random_gpt2_hf_state_dict(1, vocab=V, block=T, dim=DIM, depth=DEPTH).items()}
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # saved checkpoints may drop the tied head
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert convert.main(["--format", "gpt2-hf", "--input", str(tmp_path / "model.safetensors"), "--output",
                         str(tmp_path / "b"), "--heads", str(HEADS)]) == 0
    x = np.random.default_rng(4).integers(0, V, (2, 16))
    np.save(tmp_path / "x.npy", x)
    assert predict.main(["--checkpoint", str(tmp_path / "b"), "--tokens", str(tmp_path / "x.npy"), "--output",
                         str(tmp_path / "l.npy")]) == 0
    ref = R.gpt2_forward(sd, x, heads=HEADS)
    assert np.linalg.norm(np.load(tmp_path / "l.npy") - ref) / np.linalg.norm(ref) <= 1e-5
    assert export.main(["--checkpoint", str(tmp_path / "b"), "--format", "gpt2-hf", "--output",
                        str(tmp_path / "back.safetensors")]) == 0
    back = read_tensors(tmp_path / "back.safetensors")
    for k, v in sd.items():
        if not k.endswith(("attn.bias", "attn.masked_bias")):
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bad_files_list_every_problem_and_write_nothing(crate_gpt, tmp_path, capsys):
    _, sd = crate_gpt
    bad = dict(sd)
    del bad["transformer.h.1.ista.weight"]
    bad["transformer.h.0.attn.c_proj.weight"] = bad["transformer.h.0.attn.c_proj.weight"][:, :8]
    bad["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1
    write_pth(tmp_path / "bad.pt", bad)
    out = tmp_path / "out"
    assert convert.main(["--format", "crate-gpt-torch", "--input", str(tmp_path / "bad.pt"), "--output", str(out),
                         "--heads", str(HEADS)]) == 2
    err = capsys.readouterr().err
    for needle in ("missing (1)", "transformer.h.1.ista.weight", "unexpected (1)", "transformer.h.0.extra.weight",
                   "mis-shaped (1)", "expected (32, 32), got (32, 8)", "an untied head cannot be imported"):
        assert needle in err, needle
    assert not out.exists()
    # heads cannot be guessed for a size outside the tables; the wrong --format is named
    assert convert.main(["--format", "crate-gpt-torch", "--input", str(tmp_path / "bad.pt"), "--output", str(out)]) == 2
    assert "match no crate_gpt size" in capsys.readouterr().err
    assert convert.main(["--format", "gpt2-hf", "--input", str(tmp_path / "bad.pt"), "--output", str(out),
                         "--heads", "4"]) == 2
    assert "wrong --format (crate-gpt-torch vs gpt2-hf)" in capsys.readouterr().err and not out.exists()
    np.save(tmp_path / "big.npy", np.full((1, 4), V))
    assert predict.main(["--checkpoint", str(crate_gpt[0] / "bundle"), "--tokens", str(tmp_path / "big.npy"),
                         "--output", str(tmp_path / "o.npy")]) == 2
    assert "outside the vocabulary [0, 300)" in capsys.readouterr().err and not (tmp_path / "o.npy").exists()


def test_generate_with_cache_and_analyze_tokens(crate_gpt, tmp_path, capsys):
    d, _ = crate_gpt
    tok = train_bpe(documents(), V)
    tok.save(d / "bundle" / "tokenizer.json")
    assert generate.main(["--checkpoint", str(d / "bundle"), "--prompt", "the quick brown", "--max-new-tokens", "6",
                          "--temperature", "0", "--compare-no-cache"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("the quick brown")
    assert "one tensor (w: q = k = v) per layer" in out.err and "greedy with cache == without: True" in out.err
    np.save(tmp_path / "seq.npy", np.random.default_rng(0).integers(0, V, (3, T)))
    assert analyze.main(["--checkpoint", str(d / "bundle"), "--tokens", str(tmp_path / "seq.npy"), "--out",
                         str(tmp_path / "an"), "--batch-size", "3"]) == 0
    rows = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["compression"] > 0 and 0 < r["sparsity"] <= 1 for r in rows)
    assert (tmp_path / "an" / "rate_reduction.png").is_file()
