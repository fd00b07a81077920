"""Parameters of another model kind, mapped into an image classifier's tree (for fine-tuning).

`classifier_params_from(kind, config, params, fresh)` takes the parameters of a bundle / training run of
`kind` (its `model.json` config dict) and returns a tree in the classifier's layout, holding what the
source has a counterpart for; leaves it has none for are taken from `fresh`, and their paths returned:

* `classifier`: unchanged (the head is the caller's `dont_load`);
* `self_distill` (a SimDINO student or teacher): its `backbone/...` subtree, which *is* a headless
  classifier of the same config; the DINO projection head is dropped;
* `crate_mae`: the encoder of docs/math.md §CRATE-MAE into a `model='crate'` classifier of the same width, depth and heads,
  `lmbda = 0.5` and `final_ln_eps = 1e-6` (checked): `patch_embed` → `embedding` (the conv kernel
  `[P, P, C, d]`, flattened to `[P²C, d]` for CRATE's linear stem; the flattening order is the patch
  feature order, so the map is exact), `cls`, the fixed `decoder_pos_embed` table (what the encoder adds)
  → the learned `pos_embedding` (MAE's fine-tuning makes it trainable too), `encoder/blocks`, `norm` →
  `encoder_norm`. CRATE's classifier stem has two LayerNorms around its linear map (docs/math.md §CRATE) that the
  MAE's conv stem has not: `patch_norm` and `embed_norm` keep their fresh init (γ = 1, β = 0), so the
  fine-tuned network starts from a stem that normalises where the MAE's did not. The MAE decoder,
  `mask_token` and `decoder_embed` are dropped. A conv-stem classifier (`crate_alpha` / `vit`) cannot hold
  CRATE blocks, so it is refused. `mae_classifier_overrides` gives the classifier fields that make the
  blocks' math match (`configs/transfer.py` applies them when `init=` is a CRATE-MAE bundle); with
  `target` given, a mismatch is an error naming the fields to set.
"""

from __future__ import annotations

import numpy as np

from crate_jax.models.config import ModelConfig


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _fill_missing(mapped: dict, fresh: dict) -> list[str]:
    """Copies every leaf of `fresh` absent from `mapped` into it; returns their '/' paths."""
    filled = []
    for path, value in _flat(fresh):
        node = mapped
        for k in path[:-1]:
            node = node.setdefault(k, {})
        if path[-1] not in node:
            node[path[-1]] = value
            filled.append("/".join(path))
    return filled


def mae_classifier_overrides(mae_config: dict) -> dict:
    """The `ModelConfig` fields a CRATE classifier needs to hold a CRATE-MAE encoder exactly."""
    from crate_jax.models.mae import MAEConfig

    mae = MAEConfig.from_dict(mae_config)
    return dict(model="crate", width=mae.width, depth=mae.depth, num_heads=mae.num_heads, patch_size=mae.patch_size,
                lmbda=mae.lmbda, eta=mae.eta, ln_eps=mae.ln_eps, final_ln_eps=mae.final_ln_eps)


def _mae_to_crate(cfg: dict, params: dict, target: ModelConfig | None, fresh: dict) -> dict:
    from crate_jax.models.mae import MAEConfig, mae_sincos_2d

    mae = MAEConfig.from_dict(cfg)
    if target is not None:
        bad = [f"{k}={getattr(target, k)!r} (the CRATE-MAE encoder has {k}={v!r})"
               for k, v in mae_classifier_overrides(cfg).items() if getattr(target, k) != v]
        if bad:
            raise ValueError("a CRATE-MAE encoder initialises a CRATE classifier of the same structure; set "
                             + ", ".join(f"config.model.{b}" for b in bad))
    if "patch_norm" not in fresh or "embed_norm" not in fresh:
        raise ValueError("a CRATE-MAE encoder (CRATE blocks) initialises only a model='crate' classifier")
    kernel = np.asarray(params["patch_embed"]["kernel"])
    stem = fresh["embedding"]["kernel"]
    return {"embedding": {"kernel": kernel.reshape(stem.shape), "bias": np.asarray(params["patch_embed"]["bias"])},
            "cls": np.asarray(params["cls"]),
            "pos_embedding": mae_sincos_2d(mae.grid, mae.width)[None],
            "encoder": params["encoder"],
            "encoder_norm": params["norm"]}


def classifier_params_from(kind: str | None, config: dict | None, params: dict, fresh: dict,
                           target: ModelConfig | None = None) -> tuple[dict, list[str]]:
    """`(tree, kept_fresh)`: `params` of a `kind` model mapped into the classifier tree of `target`/`fresh`
    (module docstring); `kept_fresh` lists the classifier leaves the source had no counterpart for."""
    if kind in (None, "classifier"):
        return params, []
    if kind == "self_distill":
        if "backbone" not in params:
            raise ValueError("a self-distillation checkpoint without backbone/ parameters")
        return params["backbone"], []
    if kind == "crate_mae":
        mapped = _mae_to_crate(config or {}, params, target, fresh)
        head = {k: v for k, v in fresh.items() if k == "head"}
        kept = _fill_missing(mapped, {k: v for k, v in fresh.items() if k in ("patch_norm", "embed_norm")})
        mapped.update(head)  # the caller's dont_load decides; the MAE has no head
        return mapped, kept
    raise ValueError(f"a {kind!r} model cannot initialise an image classifier (known: classifier, self_distill, "
                     f"crate_mae)")
