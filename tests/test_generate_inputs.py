"""Bad numeric options and inputs of `generate` and `analyze` through their commands: one `error:` line, exit 2,
advice that never names a value the command itself refuses, and the inputs byte-identical afterwards."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crate_jax import analyze, generate
from crate_jax.text.bpe import train_bpe
from test_lm_cli import T, V, crate_gpt  # noqa: F401 - the module-scoped bundle fixture
from test_lm_data import documents

REPO = Path(__file__).resolve().parents[1]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def lm_bundle(crate_gpt):  # noqa: F811
    d, _ = crate_gpt
    tok = train_bpe(documents(), V)
    if not (d / "bundle" / "tokenizer.json").exists():
        tok.save(d / "bundle" / "tokenizer.json")
    return d / "bundle"


def _one_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("option,value,needle", [
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
    ("--top-k", "-3", "--top-k must be >= 0"),
    ("--num-samples", "0", "--num-samples must be >= 1"),
    ("--seed", "-1", "--seed must be in [0, 2**32)"),
])
def test_generate_refuses_bad_numbers(lm_bundle, capsys, option, value, needle):
    before = digest(lm_bundle)
    assert generate.main(["--checkpoint", str(lm_bundle), "--prompt", "the", option, value]) == 2
    out = capsys.readouterr()
    assert needle in _one_error(out.err) and out.out == ""
    assert digest(lm_bundle) == before


def test_generate_long_prompt_advice_is_itself_accepted(lm_bundle, capsys):
    """A prompt longer than the block: the advice may not be `--max-new-tokens 0` (which is refused); following
    the advice it gives (a prompt of block - 1 tokens) works."""
    prompt = " ".join(["the quick brown fox"] * 40)
    assert generate.main(["--checkpoint", str(lm_bundle), "--prompt", prompt, "--max-new-tokens", "1"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert f"shorten the prompt to at most {T - 1} tokens" in line and "max_new_tokens to 0" not in line
    tok = train_bpe(documents(), V)
    short = tok.decode(tok.encode(prompt)[: T - 1])
    assert len(tok.encode(short)) <= T - 1
    assert generate.main(["--checkpoint", str(lm_bundle), "--prompt", short, "--max-new-tokens", "1",
                          "--temperature", "0"]) == 0


def test_generate_nan_temperature_through_the_command(lm_bundle):
    """The same refusal as a user meets it: `python -m crate_jax.generate`, stderr one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "crate_jax.generate", "--checkpoint", str(lm_bundle), "--prompt", "x",
                        "--temperature", "nan"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stdout == ""
    assert "--temperature must be a finite number" in _one_error(r.stderr)


def test_analyze_names_nan_images(tmp_path, capsys):
    """A NaN image is refused for its NaN values, not as 'out of [0, 1]' with a range inside [0, 1]."""
    from crate_jax.analysis.samples import ImageSourceError, to_rgb_uint8
    from test_analysis import make_bundle
    img = np.full((2, 16, 16, 3), 0.5, np.float32)
    img[1, 3, 4, 0] = np.nan
    with pytest.raises(ImageSourceError, match="1 of 768 values are NaN or infinite"):
        to_rgb_uint8(img[1], "imgs.npy[1]")
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "imgs.npy", img)
    ckpt, _ = make_bundle(inputs, "crate")
    before = digest(inputs)
    assert analyze.main(["--checkpoint", str(ckpt), "--images", str(inputs / "imgs.npy"), "--out",
                         str(tmp_path / "out")]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "NaN or infinite" in line and "[0.5, 0.5]" not in line
    assert digest(inputs) == before
