"""Initialising a model from a pretrained checkpoint (docs/math.md §Position tables): parameters whose path matches
`init.dont_load` keep their fresh init (the head, by default); a patch kernel of another size is
bilinearly resized; a position embedding of another length is resampled on the 2-D grid (or along
the flattened 1-D token axis, CLIPA's mode, with `init.posemb_resample='1d'`)."""

from __future__ import annotations

import re

import jax
import numpy as np

from crate_jax.checkpoint.params import read_params
from crate_jax.models import posemb
from crate_jax.train.optim import path_str


def adapt(loaded: dict, fresh: dict, *, dont_load: str | None = r"head/.*", posemb_mode: str = "2d") -> dict:
    """Merge `loaded` into the structure of `fresh`, adapting shapes where the recipe allows."""
    rx = re.compile(dont_load) if dont_load else None
    flat_loaded = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    problems = []

    def one(p, fresh_leaf):
        name = path_str(p)
        if rx is not None and rx.fullmatch(name):
            return fresh_leaf
        if name not in flat_loaded:
            problems.append(f"{name}: missing in the checkpoint (expected shape {fresh_leaf.shape})")
            return fresh_leaf
        v = flat_loaded[name]
        if v.shape == fresh_leaf.shape:
            return v.astype(fresh_leaf.dtype)
        if name.endswith("pos_embedding") and v.ndim == 3:
            new_len = fresh_leaf.shape[1]
            if posemb_mode == "1d":
                return posemb.resample_1d(v, new_len).astype(fresh_leaf.dtype)
            return posemb.resample_2d(v, int(round(np.sqrt(new_len - 1)))).astype(fresh_leaf.dtype)
        if name.endswith("embedding/kernel") and v.ndim == 4 and v.shape[2:] == fresh_leaf.shape[2:]:
            return posemb.resize_patch_kernel(v, fresh_leaf.shape[0]).astype(fresh_leaf.dtype)
        problems.append(f"{name}: checkpoint shape {v.shape}, model expects {fresh_leaf.shape}")
        return fresh_leaf

    out = jax.tree_util.tree_map_with_path(one, fresh)
    if problems:
        raise ValueError("cannot initialise from the pretrained checkpoint:\n  " + "\n  ".join(problems))
    return out


def checkpoint_meta(path) -> dict | None:
    """The `model.json` of a bundle, a training workdir or one of its `checkpoints/<step>` dirs (None if absent)."""
    import json

    from crate_jax.checkpoint.bundle import MODEL_JSON
    from crate_jax.checkpoint.training import as_path

    p = as_path(path)
    for d in (p, p.parent.parent):
        try:
            if (d / MODEL_JSON).exists():
                return json.loads((d / MODEL_JSON).read_text())
        except (OSError, ValueError):
            return None
    return None


def load_pretrained(init_cfg, fresh: dict, *, loaded: dict | None = None, target=None) -> dict:
    """`fresh` (host numpy tree) with the parameters of `init_cfg.checkpoint` merged in (see `adapt`):
    `init_cfg.dont_load` (regex, default the head) keeps fresh values, `init_cfg.posemb_resample`
    ('2d' | '1d') resamples a position embedding of another length. A checkpoint of another model kind (a
    SimDINO student / teacher bundle or run, a CRATE-MAE encoder) is first mapped into the classifier's tree
    (`crate_jax.models.backbones.classifier_params_from`; `target`, the classifier's config, if given, is
    checked against the source's structure)."""
    if loaded is None:
        from crate_jax.models.backbones import classifier_params_from
        from crate_jax.train import metrics as M

        loaded = read_params(init_cfg.checkpoint)
        meta = checkpoint_meta(init_cfg.checkpoint) or {}
        if meta.get("kind") not in (None, "classifier"):
            loaded, kept = classifier_params_from(meta["kind"], meta.get("config"), loaded, fresh, target)
            M.console(f"initialising the classifier from the {meta['kind']} backbone in {init_cfg.checkpoint}"
                      + (f"; no counterpart, kept fresh: {', '.join(kept)}" if kept else ""))
    return adapt(loaded, fresh, dont_load=init_cfg.get("dont_load", r"head/.*"),
                 posemb_mode=init_cfg.get("posemb_resample", "2d"))
