"""`crate-jax COMMAND [ARGS ...]`: one console command for every crate_jax tool.

Each command runs a tool's `main(argv)` with the remaining arguments, exactly as `python -m MODULE ARGS`
does (both stay available); `crate-jax COMMAND --help` prints that tool's help. Exit codes follow
`crate_jax.errors` (2 for an unknown command, with the closest names).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import sys
from pathlib import Path

from crate_jax import __version__, errors

PROG = "crate-jax"
SUMMARY_WIDTH = 100

# command -> (module whose main(argv) runs it, summary; None: the module docstring's first line).
COMMANDS: dict[str, tuple[str, str | None]] = {
    "train": ("crate_jax.train.__main__",
              "Train a model from a config file, or resume it from its workdir (--config, --workdir)."),
    "aot": ("crate_jax.aot", None),
    "sweep": ("crate_jax.sweep", None),
    "info": ("crate_jax.info", None),
    "convert": ("crate_jax.convert", None),
    "export": ("crate_jax.export", None),
    "predict": ("crate_jax.predict", None),
    "analyze": ("crate_jax.analyze", None),
    "reconstruct": ("crate_jax.reconstruct", None),
    "segment": ("crate_jax.segment", "Emergent segmentation, measured: MaskCut, COCO AP, attention mIoU."),
    "generate": ("crate_jax.generate", None),
    "ssl-bundles": ("crate_jax.ssl.bundles", "Bundles of self-supervised runs: SimDINO student / teacher, CRATE-MAE."),
    "text-prepare": ("crate_jax.data.tokens.prepare", None),
    "tokenizer": ("crate_jax.text.tokenizer", "Write a BERT-layout WordPiece vocab.txt from a caption file."),
    "bpe": ("crate_jax.text.bpe", "Train a byte-level BPE tokenizer (GPT-2's kind) on local UTF-8 text files."),
    "arrayrecord-convert": ("crate_jax.data.image_text.arrayrecord_convert", None),
    "synth-scenes": ("crate_jax.data.image_text.synth_scenes", None),
    "coco-scenes": ("crate_jax.data.images.coco_scenes", None),
    "demo": ("crate_jax.demos.clipa", "CLIPA in miniature on a CPU: pre-train, fine-tune, zero-shot (make demo)."),
    "demo-lm": ("crate_jax.demos.lm", "White-box language models in miniature, offline (make demo-lm)."),
    "demo-mlm": ("crate_jax.demos.mlm", "CRATE-BERT vs BERT in miniature on Python's own English text (make demo-mlm)."),
    "demo-ssl": ("crate_jax.demos.ssl", "SimDINO and CRATE-MAE in miniature on real MNIST, offline (make demo-ssl)."),
    "demo-seg": ("crate_jax.demos.segmentation", "Emergent segmentation in miniature: CRATE-α vs ViT, COCO AP, mIoU."),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Texts of several lines (a docstring's paragraphs, usage examples) as written; one-line texts (a
    group's description) wrapped to the terminal, as argparse wraps every option's help."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def tool_parser(module: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """The one parser layout of every tool: `usage:` with the program as it was started (`crate-jax COMMAND`
    under this command, else `python -m MODULE`), the first paragraph of `doc` (the tool's docstring), the
    options, each with its help, then the rest of `doc` as written. Every tool also lists `--debug`, which
    `crate_jax.errors.run` takes out of the arguments before the tool parses them."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    started = sys.argv[0] if sys.argv and sys.argv[0].startswith(f"{PROG} ") else f"python -m {module}"
    kwargs.setdefault("prog", started)
    kwargs.setdefault("formatter_class", HelpFormatter)
    parser = argparse.ArgumentParser(description=head or None, epilog=rest or None, **kwargs)
    parser.add_argument(errors.DEBUG_FLAG, action="store_true", help="on a failure, print its traceback too")
    return parser


def module_file(module: str) -> Path:
    """The source file of a crate_jax module, found without importing it (help stays fast: no JAX)."""
    return Path(__file__).resolve().parent.joinpath(*module.split(".")[1:]).with_suffix(".py")


def summary(name: str) -> str:
    module, text = COMMANDS[name]
    if text:
        return text
    doc = ast.get_docstring(ast.parse(module_file(module).read_text(encoding="utf-8"))) or ""
    # The first sentence of the first paragraph (a docstring's first line may stop mid-sentence), kept to one line.
    first = " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(",;:")
    if len(first) > SUMMARY_WIDTH:
        first = first[:SUMMARY_WIDTH - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return first or f"python -m {module}"


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS ...]        ({PROG} COMMAND --help: that command's options)",
             "",
             "White-box transformers (CRATE, CRATE-alpha) in JAX / Flax NNX. Every command is also",
             "`python -m MODULE`; add --debug to any command for a traceback on failure.",
             "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    lines += ["", "options:", "  -h, --help  this list", "  --version   the crate_jax version"]
    return "\n".join(lines)


def unknown(name: str) -> errors.UsageError:
    close = difflib.get_close_matches(name, COMMANDS, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return errors.UsageError(f"{PROG}: unknown command {name!r}{hint} ({PROG} --help lists the commands)")


def dispatch(argv: list[str]) -> int | None:
    """Runs the command `argv[0]` with `argv[1:]` (see the module docstring)."""
    if not argv:
        print(help_text())
        return errors.EXIT_USAGE
    name, rest = argv[0], list(argv[1:])
    if name in ("-h", "--help"):
        print(help_text())
        return errors.EXIT_OK
    if name == "--version":
        print(f"crate_jax {__version__}")
        return errors.EXIT_OK
    if name == "help":  # `crate-jax help train` == `crate-jax train --help`
        if not rest:
            print(help_text())
            return errors.EXIT_OK
        name, rest = rest[0], ["--help"]
    if name not in COMMANDS:
        raise unknown(name)
    module = importlib.import_module(COMMANDS[name][0])
    saved = sys.argv
    sys.argv = [f"{PROG} {name}", *rest]  # argparse names the program after argv[0]
    try:
        return module.main(rest)
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    """The `crate-jax` console script: exits with the command's code (see `crate_jax.errors`)."""
    errors.exit_with(dispatch, argv)


if __name__ == "__main__":
    main()
