"""The output contract (`crate_jax.checkpoint.outputs`): an output that is, holds or lies inside an input is
refused with one `error:` line and exit 2 before anything is read, the inputs byte-identical afterwards; an
`--overwrite` killed at any file operation of its swap leaves the complete old or the complete new output
under the name, and the next run cleans up what the killed one left."""

import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from crate_jax import analyze, convert, errors, export, predict
from crate_jax.checkpoint import outputs
from crate_jax.checkpoint.bundle import load_bundle, params_dict, save_bundle
from crate_jax.checkpoint.outputs import OutputError, check_output
from crate_jax.data.tokens import prepare
from fs_helpers import tree_digest

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, module, *argv) -> tuple[int, str]:
    """`(exit code, the one error line)` of `module.main(argv)` under the exit-code contract."""
    code = errors.run(module.main, [str(a) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return code, err[0]


def subprocess_cli(module: str, *argv, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(outputs.KILL_ENV, None)
    if kill_at is not None:
        env[outputs.KILL_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=REPO)


def siblings(path: Path) -> list[str]:
    """Everything beside `path` that carries its name (leftovers of a swap)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith((f"{path.name}.", f".{path.name}.")))


# ------------------------------------------------------------------------------------ check_output
def test_check_output_refuses_equal_inside_and_containing_paths(tmp_path):
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("x")
    cases = ((src, [src], "is the input"), (src / "sub" / "a.txt", [src / "sub" / "a.txt"], "is the input"),
             (src / "sub" / "new", [src], "lies inside the input"), (tmp_path, [src], "contains the input"),
             (src, [src / "sub" / "a.txt"], "contains the input"))
    for out, inputs, rel in cases:
        with pytest.raises(OutputError, match=rel) as e:
            check_output(out, inputs)
        assert str(out) in str(e.value) and str(inputs[0]) in str(e.value)
    with pytest.raises(OutputError, match="lies inside the training workdir"):
        check_output(src / "bundle", workdirs=[src])
    check_output(tmp_path / "data2", [src])  # a common name prefix is no overlap
    check_output(tmp_path / "other", [src, None, ""])


def test_check_output_resolves_symlinks_and_relative_paths(tmp_path, monkeypatch):
    src = tmp_path / "data"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(OutputError, match="is the input"):
        check_output(tmp_path / "link", [src])
    with pytest.raises(OutputError, match="lies inside"):
        check_output(tmp_path / "link" / "out", [src])
    with pytest.raises(OutputError, match="contains"):
        check_output(tmp_path, [tmp_path / "link"])
    monkeypatch.chdir(src)
    with pytest.raises(OutputError, match="is the input"):
        check_output(".", [src])
    with pytest.raises(OutputError, match="lies inside"):
        check_output("../data/x", ["."])
    check_output("../elsewhere", ["."])
    with pytest.raises(OutputError, match="contains"):
        check_output("gs://b/runs", ["gs://b/runs/r1/"])
    check_output("gs://b/runs2", ["gs://b/runs"])
    check_output("gs://b/runs", [src])


def test_atomic_output_refuses_without_overwrite_and_keeps_old_on_request(tmp_path, capsys):
    out = tmp_path / "o"
    with outputs.atomic_output_dir(out) as t:
        (t / "v").write_text("1")
    with pytest.raises(OutputError, match="--overwrite"):
        with outputs.atomic_output_dir(out) as t:
            (t / "v").write_text("2")
    with pytest.raises(RuntimeError):
        with outputs.atomic_output_dir(out, overwrite=True) as t:
            (t / "v").write_text("2")
            raise RuntimeError("a failure while writing")
    assert (out / "v").read_text() == "1" and siblings(out) == []
    with outputs.atomic_output_dir(out, overwrite=True, keep_old=True) as t:
        (t / "v").write_text("3")
    (old,) = siblings(out)
    assert old.startswith("o.old-") and (tmp_path / old / "v").read_text() == "1" and (out / "v").read_text() == "3"
    with pytest.raises(OutputError, match="is a directory"):
        with outputs.atomic_output_file(out, overwrite=True):
            pass
    f = tmp_path / "f.bin"
    with outputs.atomic_output_file(f) as fh:
        fh.write(b"a")
    with outputs.atomic_output_file(f, overwrite=True) as fh:
        fh.write(b"b")
    assert f.read_bytes() == b"b" and siblings(f) == []
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask  # the user's umask, not tempfile's 0600 / 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out / "v")} == {0o777 & ~mask, 0o666 & ~mask}
    assert "kept the previous output" in capsys.readouterr().err


SWAP_SNIPPET = """
import sys
from pathlib import Path
from crate_jax.checkpoint import outputs
if {no_exchange}:
    outputs._exchange = lambda a, b: False
with outputs.atomic_output_dir({path!r}, overwrite=True, keep_old={keep_old}) as t:
    for i in range(3):
        (t / f"f{{i}}").write_text({text!r} * (i + 1))
"""


@pytest.mark.parametrize("no_exchange,keep_old", [(False, False), (True, False), (True, True)])
def test_a_swap_killed_at_every_operation_leaves_old_or_new(tmp_path, no_exchange, keep_old):
    """The swap itself, with the atomic exchange and with the rename-aside fallback, killed before each of its
    renames and removes: the name holds old or new, or, in the fallback's one window, is missing while the
    complete old output waits under `.NAME.old-*`, which the next run (`recover`) restores first."""
    out, old, new = tmp_path / "o", tmp_path / "ref_old", tmp_path / "ref_new"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        for i in range(3):
            (d / f"f{i}").write_text(text * (i + 1))
    olds, news = tree_digest(old), tree_digest(new)
    snippet = SWAP_SNIPPET.format(no_exchange=no_exchange, path=str(out), keep_old=keep_old, text="new")
    for n in range(1, 10):
        for p in [out] + [out.parent / s for s in siblings(out)]:
            shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(old, out)
        r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO), outputs.KILL_ENV: str(n)})
        if r.returncode == 0:
            break
        assert r.returncode == 137, r.stderr
        if out.exists():
            assert tree_digest(out) in (olds, news)
        else:  # between the two renames of the fallback: the old output is complete beside the name
            (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".o.old-")]
            assert no_exchange and tree_digest(aside) == olds
        outputs.recover(out)  # what the next run does first (the killed writer's pid is gone)
        assert tree_digest(out) in (olds, news)
        left = siblings(out)
        assert all(not p.startswith(".") for p in left)  # temporaries and hidden old outputs are gone
        assert all(tree_digest(tmp_path / p) == olds for p in left) and len(left) <= keep_old
    else:
        pytest.fail("the swap never completed")
    assert tree_digest(out) == news
    left = siblings(out)
    assert n >= (4 if no_exchange else 3) - keep_old and len(left) == keep_old
    assert all(p.startswith("o.old-") and tree_digest(tmp_path / p) == olds for p in left)


# ------------------------------------------------------------------------------------ commands, issue cases 1, 2, 11
def tiny_bundle(path: Path, seed: int = 0) -> Path:
    from crate_jax.models import build_model
    from crate_jax.models.config import model_config
    cfg = model_config("crate", "T/8", image_size=16, depth=1, width=32, num_heads=2, mlp_dim=64, num_classes=3)
    save_bundle(path, cfg, params_dict(build_model(cfg, seed)))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("src") / "bundle")


def fake_workdir(path: Path, bundle: Path) -> Path:
    """A training workdir's layout (model.json + checkpoints/): the command must refuse before reading it."""
    (path / "checkpoints" / "2").mkdir(parents=True)
    (path / "model.json").write_bytes((bundle / "model.json").read_bytes())
    (path / "checkpoints" / "2" / "state").write_bytes(os.urandom(64))
    (path / "metrics.jsonl").write_text('{"step": 2}\n')
    return path


def test_export_never_writes_over_its_checkpoint(bundle, tmp_path, capsys):
    wd = fake_workdir(tmp_path / "run", bundle)
    before = tree_digest(tmp_path)
    for output, rel in ((wd, "is the training workdir"), (wd / "bundle", "lies inside"), (tmp_path, "contains")):
        code, line = run_cli(capsys, export, "--checkpoint", wd, "--format", "bundle", "--output", output,
                             "--overwrite")
        assert code == 2 and rel in line and str(wd) in line
        assert tree_digest(tmp_path) == before
    code, line = run_cli(capsys, export, "--checkpoint", wd, "--format", "crate-torch", "--output",
                         wd / "w.safetensors", "--overwrite")
    assert code == 2 and "lies inside the training workdir" in line and tree_digest(tmp_path) == before
    before = tree_digest(bundle)
    code, line = run_cli(capsys, export, "--checkpoint", bundle, "--format", "bundle", "--output", bundle,
                         "--overwrite")
    assert code == 2 and "is the input" in line and tree_digest(bundle) == before
    code, line = run_cli(capsys, export, "--checkpoint", bundle, "--format", "bundle", "--output", tmp_path / "b",
                         "--torch-safetensors", tmp_path / "b" / "w.safetensors")
    assert code == 2 and "torch-safetensors" in line and not (tmp_path / "b").exists()
    code, line = run_cli(capsys, convert, "--format", "crate-torch", "--input", bundle / "model.json", "--output",
                         bundle, "--overwrite")
    assert code == 2 and "contains the input" in line and tree_digest(bundle) == before


def write_corpus(d: Path) -> Path:
    d.mkdir(parents=True)
    r = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in tall green trees".split()
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(r.choice(words) for _ in range(300)) + "\n")
    return d


def test_text_prepare_never_writes_over_its_input(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    before = tree_digest(corpus)
    common = ["--train-tokenizer", "300", "--val-fraction", "0", "--overwrite"]
    for inputs, output, rel in (([corpus], corpus, "is the input"), ([corpus / "doc0.txt"], corpus, "contains"),
                                ([corpus], corpus / "tokens", "lies inside"),
                                ([f"{corpus}/*.txt"], corpus, "contains")):
        code, line = run_cli(capsys, prepare, "--input", *inputs, "--output", output, *common)
        assert code == 2 and rel in line, line
        assert tree_digest(corpus) == before
    out = tmp_path / "tok"
    assert errors.run(prepare.main, ["--input", str(corpus), "--output", str(out), *common]) == 0
    first = tree_digest(out)
    code, line = run_cli(capsys, prepare, "--input", corpus, "--output", out, *common[:-1])
    assert code == 2 and "pass --overwrite" in line and tree_digest(out) == first
    assert errors.run(prepare.main, ["--input", str(corpus), "--output", str(out), *common, "--keep-old",
                                          "--shard-tokens", "100"]) == 0
    (kept,) = siblings(out)
    assert kept.startswith("tok.old-") and tree_digest(tmp_path / kept) == first and tree_digest(out) != first
    assert tree_digest(corpus) == before


def test_predict_and_analyze_outputs_are_checked_before_any_model_is_loaded(tmp_path, capsys):
    missing = tmp_path / "no_such_bundle"  # never read: the output is refused first
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 16, 16, 3), np.float32))
    (tmp_path / "dir").mkdir()
    (tmp_path / "logits.npy").mkdir()  # a directory with an output's name
    (tmp_path / "file").write_text("keep")
    before = tree_digest(tmp_path)
    for output, want in ((tmp_path / "logits.npy", "is a directory"), (tmp_path / "file" / "logits.npy", "is a file"),
                         (x, "is the input")):
        code, line = run_cli(capsys, predict, "--checkpoint", missing, "--images", x, "--layout", "NHWC",
                             "--output", output)
        assert code == 2 and want in line, line
    for out, want in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "a", "is a file"),
                      (tmp_path / "dir", None), (tmp_path, "contains the input")):
        if want is None:  # a folder of other files is not replaced
            (tmp_path / "dir" / "notes.txt").write_text("mine")
            before = tree_digest(tmp_path)
            want = "holds other files"
        code, line = run_cli(capsys, analyze, "--checkpoint", missing, "--images", x, "--out", out)
        assert code == 2 and want in line, line
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------------ killed --overwrite
def kill_every_operation(make_old, run, check_new):
    """Runs `run(kill_at=n)` for n = 1, 2, ... on an output holding the old version until a run completes.
    After each kill the name must hold the complete old or the complete new output; the next run (the one
    with n + 1) must clean what the killed one left. Returns the stderr of every run."""
    out, old_digest = make_old()
    notes = []
    for n in range(1, 12):
        r = run(kill_at=n)
        notes.append(r.stderr)
        if r.returncode == 0:
            break
        assert r.returncode == 137, r.stderr[-2000:]
        if not out.exists():  # only between the fallback's two renames: the complete old output is beside it
            (aside,) = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old-")]
            assert tree_digest(aside) == old_digest
            continue  # the next run restores it first
        if tree_digest(out) != old_digest:
            check_new(out)
            out, old_digest = make_old()  # the next kill point again replaces an old output
    else:
        pytest.fail("the command never completed")
    check_new(out)
    assert siblings(out) == [], "leftovers of the killed runs"
    return n, notes


def test_killed_overwrite_of_text_prepare(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out, ref_old, ref_new = tmp_path / "tokens", tmp_path / "ref_old", tmp_path / "ref_new"
    args = ["--input", corpus, "--train-tokenizer", "300", "--val-fraction", "0"]
    prepare.main([str(a) for a in args + ["--output", ref_old, "--shard-tokens", "10000"]])
    prepare.main([str(a) for a in args + ["--output", ref_new, "--shard-tokens", "200"]])
    assert tree_digest(ref_old) != tree_digest(ref_new)

    def make_old():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ref_old, out)
        return out, tree_digest(ref_old)

    def check_new(path):
        assert tree_digest(path) == tree_digest(ref_new)

    n, notes = kill_every_operation(
        make_old, lambda kill_at: subprocess_cli("crate_jax.data.tokens.prepare", *args, "--output", out,
                                                 "--shard-tokens", "200", "--overwrite", kill_at=kill_at),
        check_new)
    assert n >= 3  # at least: swap, remove the old
    assert any("note: removed leftover temporary" in e for e in notes)
    assert tree_digest(corpus) == tree_digest(write_corpus(tmp_path / "again"))


def test_killed_overwrite_of_an_exported_bundle(bundle, tmp_path):
    out, ref_old = tmp_path / "exported", tmp_path / "ref_old"
    assert export.main(["--checkpoint", str(bundle), "--format", "bundle", "--output", str(ref_old)]) == 0
    src_before = tree_digest(bundle)

    def make_old():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ref_old, out)
        return out, tree_digest(ref_old)

    def check_new(path):  # Orbax's file names differ per write: compare the content
        assert json.loads((path / "model.json").read_text())["config"]["block"]["param_dtype"] == "bfloat16"
        _, model = load_bundle(path)
        _, src = load_bundle(bundle)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype)),
                     params_dict(model), params_dict(src))

    n, notes = kill_every_operation(
        make_old, lambda kill_at: subprocess_cli("crate_jax.export", "--checkpoint", bundle, "--format", "bundle",
                                                 "--dtype", "bfloat16", "--output", out, "--overwrite",
                                                 kill_at=kill_at),
        check_new)
    assert n >= 3 and any("note: removed leftover temporary" in e for e in notes)
    assert tree_digest(bundle) == src_before
