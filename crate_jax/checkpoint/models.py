"""Loading and saving any model, one way for every family and every command.

    import crate_jax
    config, model = crate_jax.load("bundles/B16")            # a bundle
    config, model = crate_jax.load("runs/digits", step=400)   # a training workdir (newest step by default)
    config, model = crate_jax.load("exports/gpt2_hf")         # a directory written by `export --format hf`
    crate_jax.save(model, config, "bundles/mine", class_names=[...], card={"license": "MIT"})

`load(path, step=None)` takes a bundle (`model.json` + `params/`), a training workdir or one of its
`checkpoints/<step>` directories (only the parameters are read), or a Hugging Face-style directory
(`config.json` + `model.safetensors`, `crate_jax.checkpoint.hf`), of any registered kind
(`crate_jax.models.registry.KINDS`). For a SimDINO run, `params='teacher'` takes the EMA teacher and
`backbone=True` the backbone alone (a headless classifier).

`save(model, config, path)` writes an atomic, self-describing bundle: the parameters and `model.json`, and
`preprocess.json` (what the inputs must look like), `class_names.json` (when the classes are known), the
tokenizer files of a text model and a `README.md` model card. `bundle_from_run` is the one writer from a
training run: it reads what the run knows (its data source's class names, eval preprocessing, tokenizer,
steps and final metrics) and calls `save`. `save_hf` writes the Hugging Face-style directory.

Bundles written before bundles described themselves (only `model.json` + `params/`) still load, with a
`BundleWarning` naming what is missing.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from crate_jax.checkpoint import describe, hf
from crate_jax.checkpoint.bundle import (MODEL_JSON, PARAMS_DIR, BundleError, load_bundle, load_config,
                                         model_from_params, params_dict, save_bundle)
from crate_jax.checkpoint.params import ParamsError, read_params
from crate_jax.weights.layout_check import is_float
from crate_jax.models import registry

PARAMS = ("student", "teacher")


class KindError(BundleError):
    """A model of another kind than the command takes; the message names both."""


class BundleWarning(UserWarning):
    """A bundle that loads but lacks what newer bundles carry (preprocessing, card)."""


# ------------------------------------------------------------------------------------------------------------
# What a path is
# ------------------------------------------------------------------------------------------------------------
def is_bundle(path) -> bool:
    path = Path(path)
    return (path / MODEL_JSON).is_file() and (path / PARAMS_DIR).is_dir()


def run_root(path) -> Path | None:
    """The training workdir of `path` (itself, or the workdir of a `checkpoints/<step>` directory), or None."""
    path = Path(path)
    if (path / MODEL_JSON).is_file() and (path / "checkpoints").is_dir():
        return path
    if (path / "state").is_dir() and (path.parent.parent / MODEL_JSON).is_file():
        return path.parent.parent
    return None


def config_of(path):
    """The model config of a bundle, a training workdir (or step directory) or a Hugging Face-style directory,
    without reading the parameters."""
    path = Path(path)
    if is_bundle(path):
        return load_config(path)
    root = run_root(path)
    if root is not None:
        return load_config(root)
    if hf.is_hf_dir(path):
        stored = hf.read_config(path).get(hf.MODEL_TYPE)
        if stored:
            return registry.config_from_dict(stored["kind"], stored["config"])
        return hf.config_and_params(path)[0]
    raise BundleError(_not_a_model(path))


def _not_a_model(path) -> str:
    return (f"{path} is not a model crate_jax can load: expected a bundle ({MODEL_JSON} + {PARAMS_DIR}/), a "
            f"training workdir ({MODEL_JSON} + checkpoints/) or an exported Hugging Face-style directory "
            f"({hf.CONFIG_JSON} + {hf.WEIGHTS})")


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, step: int | None = None, *, kind: str | tuple[str, ...] | None = None,
         params: str = "student", backbone: bool = False, cfg=None, shardings=None, allow_nonfinite: bool = False):
    """`(config, model)` of what `path` holds (module docstring). `step` picks a training checkpoint (default:
    the newest committed one). `kind` (one or several registered kinds) refuses other models with a
    `BundleError` before any parameter is read. `cfg` may override non-structural fields of a bundle's config (dtype, scan,
    remat, attention) and `shardings(abstract_param_state)` restore a bundle onto a mesh
    (`crate_jax.checkpoint.bundle.load_bundle`)."""
    cfg_, tree = None, None
    path = Path(path)
    if params not in PARAMS:
        raise BundleError(f"params={params!r}: expected one of {PARAMS}")
    if kind is not None and not backbone:
        check_kind(path, config_of(path), kind)
    if is_bundle(path):
        warn_missing(path)
        if step is not None:
            raise BundleError(f"{path} is a bundle: it has one set of parameters, no step {step}")
        if params == "teacher":
            raise BundleError(f"{path} is a bundle: it holds one set of parameters; the teacher's is chosen when "
                              f"the bundle is written (crate_jax.ssl.bundles --teacher)")
        if not backbone:
            return load_bundle(path, cfg=cfg, shardings=shardings, allow_nonfinite=allow_nonfinite)
        cfg_, tree = load_config(path), read_params(path, allow_nonfinite=allow_nonfinite)
    elif run_root(path) is not None:
        cfg_ = load_config(run_root(path))
        try:
            if params == "teacher":
                extras = read_params(path, step, subtree="extras", allow_nonfinite=allow_nonfinite)
                if not isinstance(extras, dict) or "teacher" not in extras:
                    raise BundleError(f"{path}: params='teacher', but this {registry.kind_of(cfg_)!r} run keeps no "
                                      f"EMA teacher")
                tree = extras["teacher"]
            else:
                tree = read_params(path, step, allow_nonfinite=allow_nonfinite)
        except ParamsError as e:
            raise BundleError(str(e)) from e
    elif hf.is_hf_dir(path):
        cfg_, tree = hf.config_and_params(path)
    else:
        raise BundleError(_not_a_model(path))
    if backbone:
        cfg_, tree = registry.backbone(cfg_, tree)
        if kind is not None:
            check_kind(path, cfg_, kind)
    return cfg_, model_from_params(cfg_, tree)


def check_kind(path, cfg, kind: str | tuple[str, ...]) -> None:
    """Refuses a model of another kind than `kind`, naming both."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if registry.kind_of(cfg) not in kinds:
        raise KindError(f"{path} holds a {registry.kind_of(cfg)!r} model; this needs "
                          f"{' or '.join(repr(k) for k in kinds)}")


def load_hf(directory: str | os.PathLike):
    """`(config, model)` of a directory written by `export --format hf` (or an official Hugging Face GPT-2)."""
    if not hf.is_hf_dir(directory):
        raise BundleError(f"{directory}: no {hf.CONFIG_JSON} + {hf.WEIGHTS}; expected a directory written by "
                          f"export --format hf")
    return load(directory)


def warn_missing(path) -> list[str]:
    """Warns (`BundleWarning`) about the files an old-format bundle lacks; returns their names."""
    path = Path(path)
    missing = [n for n in (describe.PREPROCESS_JSON, describe.CARD) if not (path / n).is_file()]
    if missing:
        warnings.warn(f"{path} is an old-format bundle without {' and '.join(missing)}: it loads, but it does not "
                      f"say how to preprocess inputs or what the weights are; re-save it with crate_jax.save (or "
                      f"export --format bundle) to add them", BundleWarning, stacklevel=3)
    return missing


def preprocess_of(path) -> dict | None:
    """A bundle's (or exported directory's) `preprocess.json`, None if it has none."""
    return describe.read_json(Path(path) / describe.PREPROCESS_JSON)


def class_names_of(path) -> list[str] | None:
    names = describe.read_json(Path(path) / describe.CLASS_NAMES_JSON)
    return [str(n) for n in names] if isinstance(names, list) else None


def tokenizer_path(path) -> Path | None:
    """The first tokenizer file a bundle carries (by its `preprocess.json`, else a `tokenizer.json`)."""
    path = Path(path)
    text = (preprocess_of(path) or {}).get("text") or {}
    for name in text.get("tokenizer") or ["tokenizer.json"]:
        if (path / name).is_file():
            return path / name
    return None


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------
def _params_of(model) -> dict:
    tree = params_dict(model) if isinstance(model, nnx.Module) else model
    return jax.tree.map(np.asarray, tree)


def _assets(cfg, params: dict, *, source: str, card, preprocess, class_names, tokenizer) -> dict:
    """The self-describing files of a bundle or exported directory (name -> bytes or a Path to copy)."""
    tokenizer_files = _tokenizer_files(tokenizer)
    if preprocess is None:
        preprocess = describe.preprocess_of(cfg, tokenizer_files=[str(f) for f in tokenizer_files])
    elif tokenizer_files and "text" not in preprocess:
        preprocess = {**preprocess, **describe.preprocess_of(cfg, tokenizer_files=[str(f) for f in tokenizer_files])}
    if class_names is not None:
        class_names = [str(c) for c in class_names]
    out: dict = {f.name: f for f in tokenizer_files}
    out[describe.PREPROCESS_JSON] = _json(preprocess)
    if class_names:
        out[describe.CLASS_NAMES_JSON] = _json(class_names)
    if isinstance(card, str):
        text = card
    else:
        n = int(sum(np.asarray(v).size for v in jax.tree.leaves(params)))
        text = describe.model_card(cfg, n, source=source, facts=card, class_names=class_names, preprocess=preprocess)
    out[describe.CARD] = text.encode("utf-8")
    return out


def _tokenizer_files(tokenizer) -> list[Path]:
    if tokenizer is None:
        return []
    items = [tokenizer] if isinstance(tokenizer, (str, os.PathLike)) else list(tokenizer)
    files = []
    for item in map(Path, items):
        if item.is_dir():  # a tokenizer directory: tokenizer.json, or GPT-2's vocab.json + merges.txt
            found = [item / n for n in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt") if (item / n).is_file()]
            if not found:
                raise BundleError(f"tokenizer {item}: no tokenizer.json, vocab.json + merges.txt or vocab.txt in it")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise BundleError(f"tokenizer {item}: no such file or directory")
    return files


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def save(model, config, path: str | os.PathLike, *, card: dict | str | None = None, preprocess: dict | None = None,
         class_names=None, tokenizer=None, overwrite: bool = False, keep_old: bool = False, source: str = "",
         extra: dict | None = None) -> Path:
    """Writes `model` (an `nnx.Module`, or its parameters as a nested dict) with `config` as a bundle at `path`,
    atomically (a failure leaves no half-written bundle; `overwrite` swaps an old one out only when the new one
    is complete, `keep_old` keeps it as `NAME.old-STAMP`). `card`: the `README.md` text, or facts for it
    (`license`, `converted_with`, `training`, `title`, `notes`); `preprocess`: the `preprocess.json` dict
    (default: from the config); `class_names`: list of names; `tokenizer`: file(s) or a directory copied into
    the bundle. `source` is recorded as given (keep it relative or symbolic: it travels with the bundle)."""
    params = _params_of(model)
    assets = _assets(config, params, source=source, card=card, preprocess=preprocess, class_names=class_names,
                     tokenizer=tokenizer)
    return save_bundle(path, config, params, source=source, overwrite=overwrite, keep_old=keep_old, extra=extra,
                       assets=assets)


def save_hf(model, config, path: str | os.PathLike, *, card: dict | str | None = None, preprocess: dict | None = None,
            class_names=None, tokenizer=None, overwrite: bool = False, keep_old: bool = False,
            source: str = "") -> Path:
    """Writes the Hugging Face-style directory of `model` (`crate_jax.checkpoint.hf`) atomically, with the
    same descriptive files as `save`."""
    from crate_jax.checkpoint.bundle import nonfinite_leaves, write_assets
    from crate_jax.checkpoint.outputs import atomic_output_dir
    params = _params_of(model)
    bad = nonfinite_leaves(params)
    if bad:
        raise BundleError(f"refusing to write {path}: {len(bad)} parameter arrays hold NaN or inf ({', '.join(bad[:5])})")
    eot = None
    tok = _tokenizer_files(tokenizer)
    if tok and registry.kind_of(config) == "lm":
        from crate_jax.text.bpe import BPETokenizer
        eot = BPETokenizer.load(tok[0]).eot_id
    tensors, hf_config = hf.tensors_and_config(config, params, eot_id=eot)
    assets = _assets(config, params, source=source, card=card, preprocess=preprocess, class_names=class_names,
                     tokenizer=tokenizer)
    with atomic_output_dir(path, overwrite=overwrite, keep_old=keep_old) as tmp:
        hf.write_safetensors(tmp / hf.WEIGHTS, tensors)
        (tmp / hf.CONFIG_JSON).write_bytes(_json(hf_config))
        write_assets(tmp, assets)
    return Path(path)


# ------------------------------------------------------------------------------------------------------------
# From a training run (or any loadable path) to a bundle
# ------------------------------------------------------------------------------------------------------------
def described(path) -> dict:
    """What a loadable path tells a bundle made from it: `{preprocess, class_names, tokenizer, card}` (facts).
    A training run: its config.json's data (eval preprocessing, class names, tokenizer), steps and final
    metrics; a bundle or exported directory: its own descriptive files."""
    path = Path(path)
    root = run_root(path)
    if root is None:
        return {"preprocess": preprocess_of(path), "class_names": class_names_of(path),
                "tokenizer": tokenizer_path(path), "card": {}}
    run_config = describe.read_json(root / "config.json") or {}
    tokenizer = describe.tokenizer_files_of_run(run_config)
    cfg = load_config(root)
    return {"preprocess": describe.preprocess_of(cfg, data_cfg=run_config.get("data"),
                                                 tokenizer_files=[str(t) for t in tokenizer]),
            "class_names": describe.class_names_of_run(run_config), "tokenizer": tokenizer or None,
            "card": {"training": describe.training_facts(run_config,
                                                         describe.read_json(root / "final_metrics.json"))}}


def bundle_from(source: str | os.PathLike, output: str | os.PathLike, *, step: int | None = None,
                params: str = "student", backbone: bool = False, dtype: str | None = None, fmt: str = "bundle",
                overwrite: bool = False, keep_old: bool = False, label: str | None = None,
                license: str | None = None, command: str | None = None):
    """Loads `source` (`load`) and writes it to `output` as a bundle (`fmt='bundle'`) or a Hugging Face-style
    directory (`fmt='hf'`), carrying what the source knows (`described`). `dtype` casts the floating-point
    parameters (and the compute). `label` is the source recorded in the bundle (default: `source` as given).
    Returns `(cfg, params, output path)`."""
    cfg, model = load(source, step, params=params, backbone=backbone)
    tree = jax.tree.map(np.asarray, params_dict(model))
    if dtype:
        tree = jax.tree.map(lambda a: a.astype(dtype) if is_float(a) else a, tree)
        cfg = registry.with_dtype(cfg, dtype)
    info = described(source)
    card = dict(info["card"])
    if license:
        card["license"] = license
    if command:
        card["converted_with"] = command
    if params == "teacher" or backbone:
        card.setdefault("notes", []).append(f"Parameters: the {params}'s{' backbone' if backbone else ''}.")
    write = save_hf if fmt == "hf" else save
    out = write(tree, cfg, output, card=card, preprocess=info["preprocess"],
                class_names=None if backbone else info["class_names"],  # a backbone has no head
                tokenizer=info["tokenizer"], overwrite=overwrite, keep_old=keep_old,
                source=str(source) if label is None else label)
    return cfg, tree, Path(out)

