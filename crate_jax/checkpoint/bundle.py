"""Params-only bundles: an Orbax checkpoint of the parameters plus the model config as JSON.

Layout of a bundle directory:

    DIR/model.json    {"kind": "classifier", "config": {...ModelConfig...}, "source": "..."}
    DIR/params/       Orbax (StandardCheckpointer) of the parameters as a nested dict

`convert` writes bundles from official weights, `export` from training checkpoints; `predict`,
`analyze` and fine-tuning read them. A bundle restores onto any mesh or a single device. Writing
is atomic: the bundle is assembled in a temporary sibling directory and renamed into place, so a
failure never leaves a half-written DIR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from crate_jax.checkpoint.outputs import OutputError, atomic_output_dir, check_destination
from crate_jax.models import registry

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


class BundleError(ValueError):
    """A bundle directory that cannot be read or written; the message names the path."""


def params_dict(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays (the bundle's on-disk tree)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_bundle(directory: str | os.PathLike, cfg, params: dict, *, source: str = "", overwrite: bool = False,
                extra: dict | None = None, keep_old: bool = False, assets: dict | None = None) -> Path:
    """Writes `params` (nested dict of arrays, as `params_dict` returns) and `cfg` to `directory`, with
    `assets` (bundle-relative name -> bytes to write, or a `Path` to copy) in the same atomic step. An existing
    non-empty `directory` is refused unless `overwrite`; it is then swapped out only once the new bundle is
    complete, and kept as `NAME.old-STAMP` with `keep_old` (`crate_jax.checkpoint.outputs`)."""
    directory = Path(directory).absolute()
    try:
        check_destination(directory, directory=True, overwrite=overwrite)
    except OutputError as e:
        raise BundleError(str(e)) from e
    bad = nonfinite_leaves(params)
    if bad:
        raise BundleError(f"refusing to write {directory}: {len(bad)} parameter arrays hold NaN or inf "
                          f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    meta = {"kind": registry.kind_of(cfg), "config": cfg.to_dict(), "source": source, **(extra or {})}
    # a failure or a kill leaves no half-written bundle under the name; the result is shareable
    with atomic_output_dir(directory, overwrite=overwrite, keep_old=keep_old) as tmp:
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
        write_assets(tmp, assets or {})
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
    return directory


def write_assets(directory: Path, assets: dict) -> None:
    import shutil
    for name, content in assets.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)


def nonfinite_leaves(params) -> list[str]:
    """'/'-joined paths of the floating-point arrays of `params` holding NaN or inf."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(x)
        if (np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V" or str(a.dtype) == "bfloat16") and \
                not np.all(np.isfinite(a.astype(np.float32))):
            out.append("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    return out


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise BundleError(f"{directory} is not a crate_jax bundle: {MODEL_JSON} is missing "
                          f"(expected {MODEL_JSON} and {PARAMS_DIR}/ written by crate_jax.convert or export)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e


def load_config(directory):
    """The model config a bundle's (or training workdir's) `model.json` describes."""
    meta = read_meta(directory)
    if meta.get("kind") not in registry.KINDS:
        raise BundleError(f"{directory}/{MODEL_JSON}: unknown kind {meta.get('kind')!r}, expected one of "
                          f"{sorted(registry.KINDS)}")
    try:
        return registry.config_from_dict(meta["kind"], meta["config"])
    except (registry.ConfigError, TypeError, KeyError) as e:
        raise BundleError(f"{directory}/{MODEL_JSON}: the stored config does not build: {e}") from e


def load_bundle(directory: str | os.PathLike, *, cfg=None, shardings: Callable[[nnx.State], Any] | None = None,
                allow_nonfinite: bool = False):
    """Returns `(cfg, model)`. `cfg` may override non-structural fields (dtype, scan, remat, attention);
    `shardings(abstract_param_state)` may return a matching tree of `jax.sharding.Sharding` to restore
    onto a mesh (default: the default device). Parameters holding NaN or inf are refused (a
    `BundleError` naming them) unless `allow_nonfinite`. Non-parameter variables (fixed tables) are
    not stored in a bundle: they are rebuilt from the config."""
    directory = Path(directory)
    stored = load_config(directory)
    cfg = cfg or stored
    abstract = registry.abstract(cfg)
    graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(param_state)
    sh = None if shardings is None else nnx.to_pure_dict(shardings(param_state))
    if sh is None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, sh)
    ppath = (directory / PARAMS_DIR).absolute()
    if not ppath.is_dir():
        raise BundleError(f"{directory}: {PARAMS_DIR}/ is missing or incomplete")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(ppath, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise BundleError(f"{ppath}: parameters do not match the model in {MODEL_JSON}: {e}") from e
    except Exception as e:  # noqa: BLE001 - tensorstore raises its own kinds for damaged files
        raise BundleError(f"{ppath}: the parameters cannot be read ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); the bundle is damaged "
                          f"or incomplete") from e
    bad = [] if allow_nonfinite else nonfinite_leaves(restored)
    if bad:
        raise BundleError(f"{directory}: {len(bad)} parameter arrays hold NaN or inf ({', '.join(bad[:5])}"
                          f"{', ...' if len(bad) > 5 else ''}); this model cannot give meaningful outputs")
    return cfg, _assemble(cfg, graphdef, param_state, rest, restored)


def model_from_params(cfg, params: dict):
    """The model of `cfg` (any registered kind) holding `params` (nested dict of arrays, as `params_dict`
    returns); no random init runs. Shapes must match the config exactly."""
    graphdef, param_state, rest = nnx.split(registry.abstract(cfg), nnx.Param, ...)
    return _assemble(cfg, graphdef, param_state, rest, jax.tree.map(jax.numpy.asarray, params))


def _assemble(cfg, graphdef, param_state, rest, params):
    nnx.replace_by_pure_dict(param_state, params)
    if jax.tree.leaves(rest):  # fixed tables are not stored: rebuilt from the config
        nnx.replace_by_pure_dict(rest, fixed_variables(cfg))
    return nnx.merge(graphdef, param_state, rest)


def fixed_variables(cfg) -> dict:
    """The model's non-parameter variables (e.g. fixed position tables), computed from its config: the
    parameter initialisers are dead code under jit and cost nothing."""
    def build():
        _, _, rest = nnx.split(registry.build(cfg, 0), nnx.Param, ...)
        return nnx.to_pure_dict(rest)
    return jax.jit(build)()


def to_numpy_tree(params: dict) -> dict:
    return jax.tree.map(np.asarray, params)
