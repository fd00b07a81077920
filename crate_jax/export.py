"""Export a bundle back to an official weight layout.

    python -m crate_jax.export --checkpoint bundles/B16 --format crate-alpha-torch --output B16.safetensors
    python -m crate_jax.export --checkpoint bundles/T16 --format crate-torch --output T16.pth
    python -m crate_jax.export --checkpoint bundles/B16 --format crate-alpha-jax --output B16.npz
    python -m crate_jax.export --checkpoint runs/crate_gpt --format crate-gpt-torch --output crate_gpt.pt
    python -m crate_jax.export --checkpoint runs/digits --format bundle --output bundles/digits [--license MIT]
    python -m crate_jax.export --checkpoint bundles/gpt2 --format hf --output exports/gpt2_hf

`bundle` and `hf` write directories that describe themselves (`crate_jax.checkpoint.models`): the
preprocessing (`preprocess.json`), the class names (`class_names.json`) and tokenizer of the training
data when known, and a `README.md` model card (size, training data and steps, final metrics, `--license`).
`hf` is a Hugging Face-style directory (`model.safetensors` + `config.json`) that `crate_jax.load` reads
back bit for bit; a GPT-2 is written in the official Hugging Face GPT-2 layout (`crate_jax.checkpoint.hf`).

Formats: `crate-alpha-torch` (torch_inference state_dict, docs/weights.md §Layouts), `crate-torch` (CRATE
state_dict, docs/weights.md §Layouts), `crate-alpha-jax` (big_vision flat '/' names), and for language
models `crate-gpt-torch` (CRATE-GPT, with the tied `lm_head.weight` and the causal-mask buffers)
and `gpt2-hf` (Hugging Face GPT-2, `crate_jax.weights.gpt`). The file type
follows the output's extension: `.safetensors`, `.pth`/`.pt` (needs torch), `.npz` (bfloat16 is
stored as 2-byte void, as big_vision does). Configs the official model cannot express are refused
with the reason. Values are written bit for bit (transposes and reshapes only), so
`convert -> export -> convert` reproduces the parameters exactly.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from crate_jax import errors
from crate_jax.checkpoint.outputs import atomic_output_file, check_destination, check_output
from crate_jax.checkpoint import models
from crate_jax.checkpoint.bundle import BundleError, params_dict
from crate_jax.cli import tool_parser
from crate_jax.models import ConfigError, ModelConfig
from crate_jax.models import registry
from crate_jax.weights import bert, gpt, layouts
from crate_jax.weights.readers import WeightsError, file_kind, import_torch, numpy_to_torch


DIRECTORY_FORMATS = ("bundle", "hf")


def load_params(path: str | os.PathLike, step: int | None = None) -> tuple[object, dict]:
    """`(cfg, params)` (nested numpy tree) of what `--checkpoint` names (`crate_jax.load`: a bundle, a training
    workdir at its newest committed step or `step`, or an exported directory)."""
    cfg, model = models.load(path, step)
    return cfg, jax.tree.map(np.asarray, params_dict(model))


def export_notes(fmt: str, cfg: ModelConfig) -> list[str]:
    """Differences the official model will show that the weights cannot carry (printed, not fatal)."""
    notes = []
    if fmt in gpt.LM_FORMATS or fmt in bert.FORMATS:
        return notes
    official = layouts.FINAL_LN_EPS[fmt]
    if cfg.final_ln_eps != official:
        notes.append(f"the {fmt} model's final LayerNorm uses eps {official:g}, this checkpoint {cfg.final_ln_eps:g} "
                     f"(docs/weights.md §Layouts: about 2e-6 relative change in the logits)")
    if cfg.model == "crate" and cfg.pool != "cls":
        notes.append(f"pool='{cfg.pool}' is not stored in a state_dict: build the torch CRATE model with "
                     f"pool='{cfg.pool}'")
    return notes


def export_tensors(fmt: str, cfg: ModelConfig, params: dict, source: str = "the checkpoint") -> dict[str, np.ndarray]:
    """The flat official dict of `fmt` for `(cfg, params)`; a `WeightsError` says why a config
    cannot be expressed (e.g. sincos position embedding or no biases for the torch layouts)."""
    if fmt in gpt.LM_FORMATS:  # language models (crate_jax.weights.gpt)
        return gpt.from_params(fmt, params, cfg)
    if fmt in bert.FORMATS:  # masked-LM encoders (crate_jax.weights.bert)
        return bert.from_params(fmt, params, cfg)
    layouts.check_format(fmt)
    problems = layouts.layout_problems(fmt, cfg)
    if problems:
        raise WeightsError(f"cannot export {source} ({layouts.describe(cfg)}) to {fmt}: "
                           + "; ".join(problems))
    return layouts.from_params(fmt, params, cfg)


def write_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], *, overwrite: bool = False,
                  keep_old: bool = False) -> Path:
    """Writes a flat dict to `.safetensors`, `.pth`/`.pt` or `.npz` (by extension), atomically."""
    path = Path(path)
    kind = file_kind(path)
    torch = import_torch(f"writing {path}") if kind == "torch" else None
    with atomic_output_file(path, overwrite=overwrite, keep_old=keep_old) as f:
        if kind == "safetensors":
            from safetensors.numpy import save
            f.write(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
        elif kind == "torch":
            torch.save(collections.OrderedDict((k, numpy_to_torch(v)) for k, v in tensors.items()), f)
        else:
            np.savez(f, **{k: _void_bf16(v) for k, v in tensors.items()})
    return path


def _void_bf16(a: np.ndarray) -> np.ndarray:
    """big_vision's on-disk form of bfloat16: 2-byte void (read back by `readers`)."""
    return a.view("V2") if a.dtype == ml_dtypes.bfloat16 else a


def parse_args(argv=None) -> argparse.Namespace:
    ap = tool_parser("crate_jax.export", __doc__)
    ap.add_argument("--checkpoint", required=True, help="bundle directory or training workdir")
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: the newest)")
    ap.add_argument("--format", required=True,
                    choices=list(DIRECTORY_FORMATS) + sorted(layouts.FORMATS) + sorted(gpt.LM_FORMATS)
                    + sorted(bert.FORMATS),
                    help="'bundle': params-only Orbax + model.json directory; 'hf': a Hugging Face-style directory "
                         "(model.safetensors + config.json, GPT-2 in the official layout); otherwise an official "
                         "layout file")
    ap.add_argument("--output", required=True,
                    help="bundle / hf: a new directory; official layouts: .safetensors, .pth/.pt (needs torch) or .npz")
    ap.add_argument("--license", default=None,
                    help="bundle / hf: the licence of the weights, recorded in the model card (README.md)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="bundle / hf: cast the parameters (and compute) to this dtype")
    ap.add_argument("--torch-safetensors", default=None,
                    help="bundle: also write the official torch layout (crate-torch / crate-alpha-torch) here")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output (swapped in only once the new one is complete)")
    ap.add_argument("--keep-old", action="store_true",
                    help="with --overwrite: keep the replaced output beside the new one as NAME.old-STAMP")
    return ap.parse_args(argv)


def check_outputs(args) -> None:
    """Refuses, before anything is read, outputs that overlap `--checkpoint` (a bundle or a training
    workdir) or each other, or that exist without `--overwrite`."""
    source = Path(args.checkpoint)
    workdir = (source / "checkpoints").is_dir()
    sources = dict(inputs=() if workdir else (source,), workdirs=(source,) if workdir else ())
    check_output(args.output, **sources)
    check_destination(args.output, directory=args.format in DIRECTORY_FORMATS, overwrite=args.overwrite)
    if args.torch_safetensors:
        check_output(args.torch_safetensors, **sources, flag="torch-safetensors")
        check_output(args.torch_safetensors, (args.output,), flag="torch-safetensors")
        check_destination(args.torch_safetensors, directory=False, overwrite=args.overwrite,
                          flag="torch-safetensors")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.keep_old and not args.overwrite:
            raise errors.UsageError("--keep-old keeps the output that --overwrite replaces; pass both")
        if args.format not in DIRECTORY_FORMATS:
            file_kind(args.output)
        check_outputs(args)
        if args.format in DIRECTORY_FORMATS:
            return _export_directory(args)
        cfg, params = load_params(args.checkpoint, args.step)
        tensors = export_tensors(args.format, cfg, params, source=args.checkpoint)
        write_tensors(args.output, tensors, overwrite=args.overwrite, keep_old=args.keep_old)
    except (WeightsError, BundleError, ConfigError, errors.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in export_notes(args.format, cfg):
        print(f"note: {note}", file=sys.stderr)
    n = sum(np.asarray(v).size for v in jax.tree.leaves(params))
    what = {"lm": gpt.describe, "bert": bert.describe}.get(registry.kind_of(cfg), layouts.describe)(cfg)
    print(f"exported {what}\n  {len(tensors)} tensors, {n:,} parameters, "
          f"{args.format} -> {args.output}")
    return 0


def _export_directory(args) -> int:
    """`--format bundle` / `hf`: one writer (`crate_jax.checkpoint.models.bundle_from`) carrying the run's
    preprocessing, class names, tokenizer and card."""
    torch_fmt = None
    if args.torch_safetensors:
        cfg, params = load_params(args.checkpoint, args.step)
        torch_fmt = official_torch_format(cfg)
        if torch_fmt is None:
            raise WeightsError(f"--torch-safetensors: there is no official torch layout for this model ({cfg!r:.80})")
        tensors = export_tensors(torch_fmt, cfg, params, source=args.checkpoint)  # refuse before writing anything
    cfg, params, out = models.bundle_from(args.checkpoint, args.output, step=args.step, dtype=args.dtype,
                                          fmt=args.format, overwrite=args.overwrite, keep_old=args.keep_old,
                                          license=args.license)
    n = sum(np.asarray(v).size for v in jax.tree.leaves(params))
    what = "the bundle" if args.format == "bundle" else "the Hugging Face-style directory"
    print(f"exported {n:,} parameters ({args.dtype or 'stored dtype'}) to {what} {args.output}")
    if torch_fmt:
        write_tensors(args.torch_safetensors, tensors, overwrite=args.overwrite, keep_old=args.keep_old)
        print(f"  and the {torch_fmt} layout to {args.torch_safetensors}")
    return 0


def official_torch_format(cfg) -> str | None:
    """The official torch layout of a model, if it has one."""
    if registry.kind_of(cfg) == "lm":
        return gpt.EXPORT_FORMAT.get(cfg.model)
    if registry.kind_of(cfg) == "bert":
        if cfg.model == "crate_bert":
            return "crate-bert-hf"
        return "roberta-hf" if cfg.positions == "roberta" else "bert-hf"
    if registry.kind_of(cfg) == "classifier":
        return {"crate": "crate-torch", "crate_alpha": "crate-alpha-torch"}.get(cfg.model)
    return None


if __name__ == "__main__":
    errors.exit_with(main)
