"""Export a bundle back to an official weight layout.

    python -m crate_jax.export --checkpoint bundles/B16 --format crate-alpha-torch --output B16.safetensors
    python -m crate_jax.export --checkpoint bundles/T16 --format crate-torch --output T16.pth
    python -m crate_jax.export --checkpoint bundles/B16 --format crate-alpha-jax --output B16.npz
    python -m crate_jax.export --checkpoint runs/crate_gpt --format crate-gpt-torch --output crate_gpt.pt

Formats: `crate-alpha-torch` (torch_inference state_dict, SPEC §2.5), `crate-torch` (CRATE
state_dict, SPEC §1.6), `crate-alpha-jax` (big_vision flat '/' names, SPEC §2.4), and for language
models `crate-gpt-torch` (CRATE-GPT, SPEC §5, with the tied `lm_head.weight` and the causal-mask buffers)
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

from crate_jax.checkpoint.files import atomic_file
from crate_jax.checkpoint.bundle import MODEL_JSON, BundleError, load_bundle, load_config, params_dict, save_bundle
from crate_jax.checkpoint.params import ParamsError, read_params
from crate_jax.models import ConfigError, ModelConfig
from crate_jax.models.lm import LMConfig
from crate_jax.weights import gpt, layouts
from crate_jax.weights.readers import WeightsError, file_kind, import_torch, numpy_to_torch


def load_for_export(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, dict]:
    """`(cfg, params)` (nested numpy tree) from what `--checkpoint` names: a bundle directory, or a training
    workdir (its newest committed checkpoint, or `step`; the optimizer state is not read)."""
    path = Path(path)
    if (path / MODEL_JSON).is_file() and (path / "params").is_dir():
        cfg, model = load_bundle(path)
        return cfg, jax.tree.map(np.asarray, params_dict(model))
    if (path / MODEL_JSON).is_file() and (path / "checkpoints").is_dir():
        cfg = load_config(path)
        try:
            params = read_params(path, step)
        except ParamsError as e:
            raise BundleError(str(e)) from e
        return cfg, params
    raise BundleError(f"{path} is not a crate_jax bundle ({MODEL_JSON} + params/) nor a training workdir "
                      f"({MODEL_JSON} + checkpoints/)")


def write_bundle(output: str | os.PathLike, cfg, params: dict, *, dtype: str | None, source: str,
                 overwrite: bool = False) -> Path:
    """A params-only inference bundle in `dtype` (parameters cast; the model computes in that dtype too)."""
    if dtype:
        params = jax.tree.map(lambda a: np.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype,
                                                                                    np.floating) or
                              np.asarray(a).dtype == ml_dtypes.bfloat16 else np.asarray(a), params)
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    return save_bundle(output, cfg, params, source=source, overwrite=overwrite)


def export_notes(fmt: str, cfg: ModelConfig) -> list[str]:
    """Differences the official model will show that the weights cannot carry (printed, not fatal)."""
    notes = []
    if fmt in gpt.LM_FORMATS:
        return notes
    official = layouts.FINAL_LN_EPS[fmt]
    if cfg.final_ln_eps != official:
        notes.append(f"the {fmt} model's final LayerNorm uses eps {official:g}, this checkpoint {cfg.final_ln_eps:g} "
                     f"(SPEC §2.2: about 2e-6 relative change in the logits)")
    if cfg.model == "crate" and cfg.pool != "cls":
        notes.append(f"pool='{cfg.pool}' is not stored in a state_dict: build the torch CRATE model with "
                     f"pool='{cfg.pool}'")
    return notes


def export_tensors(fmt: str, cfg: ModelConfig, params: dict, source: str = "the checkpoint") -> dict[str, np.ndarray]:
    """The flat official dict of `fmt` for `(cfg, params)`; a `WeightsError` says why a config
    cannot be expressed (e.g. sincos position embedding or no biases for the torch layouts)."""
    if fmt in gpt.LM_FORMATS:  # language models (crate_jax.weights.gpt)
        return gpt.from_params(fmt, params, cfg)
    layouts.check_format(fmt)
    problems = layouts.layout_problems(fmt, cfg)
    if problems:
        raise WeightsError(f"cannot export {source} ({layouts.describe(cfg)}) to {fmt}: "
                           + "; ".join(problems))
    return layouts.from_params(fmt, params, cfg)


def write_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], *, overwrite: bool = False) -> Path:
    """Writes a flat dict to `.safetensors`, `.pth`/`.pt` or `.npz` (by extension), atomically."""
    path = Path(path)
    kind = file_kind(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} exists; choose another output or pass --overwrite")
    torch = import_torch(f"writing {path}") if kind == "torch" else None
    with atomic_file(path) as f:
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
    ap = argparse.ArgumentParser(prog="python -m crate_jax.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="bundle directory or training workdir")
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: the newest)")
    ap.add_argument("--format", required=True, choices=["bundle"] + sorted(layouts.FORMATS) + sorted(gpt.LM_FORMATS),
                    help="'bundle': params-only Orbax + model.json directory; otherwise an official layout file")
    ap.add_argument("--output", required=True,
                    help="bundle: a new directory; official layouts: .safetensors, .pth/.pt (needs torch) or .npz")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="bundle: cast the parameters (and compute) to this dtype")
    ap.add_argument("--torch-safetensors", default=None,
                    help="bundle: also write the official torch layout (crate-torch / crate-alpha-torch) here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "bundle":
            return _export_bundle(args)
        file_kind(args.output)
        if Path(args.output).exists() and not args.overwrite:
            raise WeightsError(f"{args.output} exists; choose another output or pass --overwrite")
        cfg, params = load_for_export(args.checkpoint, args.step)
        tensors = export_tensors(args.format, cfg, params, source=args.checkpoint)
        write_tensors(args.output, tensors, overwrite=args.overwrite)
    except (WeightsError, BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in export_notes(args.format, cfg):
        print(f"note: {note}", file=sys.stderr)
    n = sum(np.asarray(v).size for v in jax.tree.leaves(params))
    what = gpt.describe(cfg) if isinstance(cfg, LMConfig) else layouts.describe(cfg)
    print(f"exported {what}\n  {len(tensors)} tensors, {n:,} parameters, "
          f"{args.format} -> {args.output}")
    return 0


def _export_bundle(args) -> int:
    cfg, params = load_for_export(args.checkpoint, args.step)
    torch_fmt = None
    if args.torch_safetensors:
        torch_fmt = (gpt.EXPORT_FORMAT.get(cfg.model) if isinstance(cfg, LMConfig) else
                     {"crate": "crate-torch", "crate_alpha": "crate-alpha-torch"}.get(getattr(cfg, "model", None)))
        if torch_fmt is None:
            raise WeightsError(f"--torch-safetensors: there is no official torch layout for this model ({cfg!r:.80})")
        tensors = export_tensors(torch_fmt, cfg, params, source=args.checkpoint)  # refuse before writing anything
    out = write_bundle(args.output, cfg, params, dtype=args.dtype, source=str(args.checkpoint),
                       overwrite=args.overwrite)
    n = sum(np.asarray(v).size for v in jax.tree.leaves(params))
    print(f"exported {n:,} parameters ({args.dtype or 'stored dtype'}) to the bundle {out}")
    if torch_fmt:
        write_tensors(args.torch_safetensors, tensors, overwrite=args.overwrite)
        print(f"  and the {torch_fmt} layout to {args.torch_safetensors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
