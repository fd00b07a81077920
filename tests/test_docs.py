"""The documentation cannot drift from the code: README.md and docs/*.md are walked and checked.

* Every fenced `sh` block preceded by the line `<!-- runnable -->` runs, each line a command, from the
  repository root; it must exit 0. Only cheap commands may be marked (`--help`, `--dry-run`,
  `crate_jax.info`, `python -c` config loading), so this stays well under a minute.
* Every repository path a document names (in links, backticks or commands) exists; `python -m` modules
  and backticked dotted `crate_jax.…` names resolve to a module; links to `#anchors` hit a heading.
* Every `docs/X.md §Section` pointer in the code, configs, benches, launch files and tests names an
  existing document and heading.
* The TPU pod commands in the configs' docstrings parse with `launch/tpu_vm.py run --dry-run`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md"] + list((ROOT / "docs").glob("*.md")))
TOP_DIRS = ("crate_jax", "configs", "bench", "launch", "tests", "docs")
MARKER = "<!-- runnable -->"
CHEAP = (re.compile(r"(^| )--help( |$)"), re.compile(r"(^| )--dry-run( |$)"), re.compile(r"-m crate_jax\.info "),
         re.compile(r"^python -c "))
PLACEHOLDER = re.compile(r"(^|[/._-])[A-Z][A-Z_]*([/._:-]|$)|[{}<>$…]|\.\.\.")  # configs/FILE.py, crate_jax.MODULE
FENCE = re.compile(r"^(```|~~~)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(text: str):
    """`(info, lines, runnable)` for every fenced block; runnable if the marker is the previous non-blank line."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        info, body, j = lines[i][3:].strip(), [], i + 1
        while j < len(lines) and not lines[j].startswith(m.group(1)):
            body.append(lines[j])
            j += 1
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        out.append((info, body, prev == MARKER))
        i = j + 1
    return out


def runnable_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in DOCS:
        for info, body, runnable in code_blocks(_text(doc)):
            if runnable:
                assert info == "sh", f"{doc.name}: a runnable block must be ```sh, got ```{info}"
                cmds += [(doc.name, ln.strip()) for ln in body if ln.strip() and not ln.strip().startswith("#")]
    return cmds


def test_docs_have_runnable_blocks_and_only_cheap_ones():
    cmds = runnable_commands()
    assert len(cmds) >= 5, cmds
    for doc, cmd in cmds:
        assert cmd.startswith("python "), f"{doc}: runnable commands start with `python `: {cmd}"
        assert any(p.search(cmd) for p in CHEAP), f"{doc}: only cheap commands may be marked runnable: {cmd}"


def _run(cmd: str) -> tuple[str, int, str]:
    argv = [sys.executable] + shlex.split(cmd)[1:]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return cmd, p.returncode, (p.stdout + p.stderr)[-2000:]


def test_runnable_blocks_run():
    cmds = sorted({cmd for _, cmd in runnable_commands()})
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(_run, cmds))
    failed = [f"{cmd}\n  exit {rc}: {out}" for cmd, rc, out in results if rc != 0]
    assert not failed, "\n".join(failed)


# Paths ------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = heading.strip().lower()
    h = "".join(c for c in h if c in " -_" or unicodedata.category(c)[0] in "LN")
    return h.replace(" ", "-")


def headings(path: Path) -> list[str]:
    out, fenced = [], False
    for line in _text(path).splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def module_exists(dotted: str) -> bool:
    """True if `a.b.c` or one of its prefixes of two or more parts is a module or package of the repository."""
    parts = dotted.split(".")
    if len(parts) == 2 and parts[0] == "crate_jax":  # the top-level API (`crate_jax.load`, `crate_jax.save`)
        import crate_jax
        if parts[1] in crate_jax.__all__:
            return True
    if parts[:2] == ["crate_jax", "configs"]:  # configs/ is installed as crate_jax.configs
        return len(parts) == 2 or (ROOT / "configs" / (parts[2] + ".py")).is_file()
    for n in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def repo_path_exists(token: str) -> bool:
    token = token.split(":", 1)[0].rstrip(".,;)")
    if "*" in token:
        return any(ROOT.glob(token))
    return (ROOT / token).exists()


def prose(text: str) -> str:
    """`text` without fenced blocks and inline code spans (where `](...)` is not a link)."""
    lines, keep, fenced = text.splitlines(), [], False
    for line in lines:
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            keep.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(keep)


def doc_problems(doc: Path) -> list[str]:
    text, problems = _text(doc), []
    base = ROOT if doc.name == "README.draft.md" else doc.parent  # the draft of README.md, links from the root
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (base / file).resolve() if file else doc
        if not dest.exists():
            problems.append(f"link {target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
            problems.append(f"link {target}: no heading with anchor #{anchor} in {dest.name}")
    for token in re.findall(r"(?<![\w./-])((?:%s)/[\w./*-]*)" % "|".join(TOP_DIRS), text):
        if PLACEHOLDER.search(re.sub(r"README|RESULTS|LICENSE", "x", token)) or token.endswith("/."):
            continue
        if not repo_path_exists(token):
            problems.append(f"path {token} does not exist")
    for name in re.findall(r"-m (crate_jax(?:\.\w+)+)", text) + re.findall(r"`(crate_jax(?:\.\w+)+)", text):
        if not PLACEHOLDER.search(name) and not module_exists(name):
            problems.append(f"module {name} does not exist")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    assert doc_problems(doc) == []


def test_path_check_can_fail(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("See `crate_jax/models/no_such_file.py`, [x](missing.md), `crate_jax.nope.gone`, "
                   "bench/NO_RESULTS.md and [y](#nowhere); not `configs/FILE.py`.\n# Here\n", encoding="utf-8")
    problems = doc_problems(bad)
    assert len(problems) == 4, problems


def test_heading_slugs():
    assert slug("CRATE-α") == "crate-α"
    assert slug("Sweeps and scaling curves") == "sweeps-and-scaling-curves"
    assert slug("The workdir, and what holds under faults") == "the-workdir-and-what-holds-under-faults"


# Pointers from the code into the docs ---------------------------------------------------------------
SECTION = r"§[^;,.:|()`'\"\n]+"
POINTER = re.compile(r"docs/([\w.]+\.md)(?: (%s(?:, %s)*))?" % (SECTION, SECTION))


def code_files():
    for d in ("crate_jax", "configs", "bench", "launch", "tests"):
        yield from (p for p in (ROOT / d).rglob("*")
                    if p.suffix in (".py", ".md", ".sh", ".sbatch") and p.name != "test_docs.py")


def test_code_pointers_into_docs_resolve():
    problems, seen = [], 0
    for path in code_files():
        for m in POINTER.finditer(_text(path)):
            seen += 1
            doc = ROOT / "docs" / m.group(1)
            if not doc.is_file():
                problems.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} does not exist")
                continue
            heads = headings(doc)
            for section in re.findall(r"§([^,§]+)", m.group(2) or ""):
                section = section.strip()
                if not any(section == h or section.startswith(h + " ") for h in heads):  # prose may follow
                    problems.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} has no section {section!r}")
    assert seen > 20 and problems == [], problems


def test_no_reference_outside_the_repository():
    pattern = re.compile(r"\.\./shared|\bSPEC\.md\b|\bSPEC §|stack-notes")
    bad = [str(p.relative_to(ROOT)) for p in list(code_files()) + DOCS if pattern.search(_text(p))]
    assert bad == []


# The configs' pod commands ----------------------------------------------------------------------------
def pod_commands() -> list[tuple[str, list[str]]]:
    out = []
    for cfg in sorted((ROOT / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(_text(cfg))) or ""
        joined = re.sub(r"\\\n\s*", " ", doc)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("python launch/tpu_vm.py run "):
                line = (line.replace("$NAME", "my-tpu").replace("$BUCKET", "gs://my-bucket")
                        .replace("gs://BUCKET", "gs://my-bucket").replace("--project PROJECT", "--project my-project"))
                out.append((cfg.name, shlex.split(line)[2:]))
    return out


def test_config_pod_commands_parse(monkeypatch):
    sys.path.insert(0, str(ROOT))
    try:
        from launch import tpu_vm
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "my-project")
    monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "us-east5-a")
    cmds = pod_commands()
    assert {name for name, _ in cmds} >= {"clipa.py", "imagenet21k.py", "lm.py", "mae.py", "simdino.py"}
    for name, argv in cmds:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = tpu_vm.main(argv + ["--dry-run"])
            except SystemExit as e:
                rc = e.code
        assert rc == 0, f"{name}: tpu_vm.py {' '.join(argv)}\n{err.getvalue()[-1000:]}"
        assert "gcloud" in out.getvalue()
