"""Evaluator `type='segmentation'`: class-agnostic COCO AP of MaskCut on a held-out COCO-format set, logged
as training runs (any task whose network has an image backbone: a classifier, a CLIP two-tower model's image
tower, a SimDINO backbone).

    config.evals.seg = dict(type="segmentation", annotations="DIR/instances.json", images="DIR/images",
                            every=1000, layer=-1, tau=0.15, n_masks=3, max_images=100, crf=False,
                            solver="auto", params="student", batch_size=16,
                            masks="DIR/masks", attention_layer=-2, mass=0.6)

`images` defaults to the `images/` folder next to `annotations` (the layout `crate_jax.data.images.coco_scenes`
writes). Images are read once; each run extracts features at the backbone's resolution, cuts, and scores with
pycocotools (`crate_jax.analysis.coco_eval`). Metrics: `mask_AP`, `mask_AP50`, `mask_AP75`, `box_AP`,
`box_AP50`, `box_AP75`, `masks_per_image`; with `masks` (VOC-layout class masks, `NAME.png` per image) also
the thresholded-attention scores of `crate_jax.analysis.attention_miou` for layer `attention_layer` (default the
penultimate): `attn_miou`, `attn_fg_iou`, `attn_jaccard`, `attn_best_head_fg_iou`. Every process computes the
same numbers (the sets are small).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crate_jax.analysis import attention_miou, coco_eval, cutler, densecrf, seg_inputs
from crate_jax.errors import ConfigError

SPEC_KEYS = ("type", "every", "annotations", "images", "layer", "tau", "n_masks", "max_images", "crf", "params",
             "batch_size", "solver", "masks", "attention_layer", "mass")


def backbone_module(model):
    """The `ImageClassifier` inside a network: itself, a two-tower's `img`, a SimDINO network's `backbone`."""
    for attr in ("img", "backbone"):
        if hasattr(model, attr):
            return getattr(model, attr)
    if not hasattr(model, "cfg") or not hasattr(model.cfg, "grid"):
        raise ConfigError(f"the segmentation evaluator needs an image backbone; a {type(model).__name__} has none")
    return model


class SegmentationEvaluator:
    """`type='segmentation'` (module docstring)."""

    def __init__(self, name: str, spec, task, mesh):
        from crate_jax.train.evaluation import every_of

        key = f"config.evals.{name}"
        unknown = sorted(set(spec.keys()) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown keys {unknown}; known keys are {sorted(SPEC_KEYS)}")
        self.name, self.mesh = name, mesh
        self.every = every_of(task.config, spec, key)
        ann = spec.get("annotations", None)
        if not ann or not Path(ann).is_file():
            raise ConfigError(f"{key}.annotations: expected a COCO instances.json, got {ann!r}")
        self.annotations = coco_eval._read_json(ann, "annotations")
        images = spec.get("images", None) or str(Path(ann).parent / "images")
        self.layer = spec.get("layer", -1)
        self.tau = float(spec.get("tau", cutler.TAU))
        self.n_masks = spec.get("n_masks", cutler.N_MASKS)
        self.batch_size = spec.get("batch_size", 16)
        for field, v in (("layer", self.layer), ("n_masks", self.n_masks), ("batch_size", self.batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or (field != "layer" and v < 1):
                raise ConfigError(f"{key}.{field}: expected an integer{' >= 1' if field != 'layer' else ''}, got {v!r}")
        self.solver = spec.get("solver", "auto")
        if self.solver not in cutler.SOLVERS:
            raise ConfigError(f"{key}.solver: got {self.solver!r}, expected one of {cutler.SOLVERS}")
        self.crf = bool(spec.get("crf", False))
        if self.crf and not densecrf.available():
            raise ConfigError(f"{key}.crf: pydensecrf2 is not installed ({densecrf.INSTALL_HINT})")
        self.params = spec.get("params", "student")
        if self.params not in ("student", "teacher"):
            raise ConfigError(f"{key}.params: got {self.params!r}, expected 'student' or 'teacher'")
        try:
            self.images = seg_inputs.read_images(images, self.annotations, spec.get("max_images", None))
        except ValueError as e:
            raise ConfigError(f"{key}.images: {e}") from None
        ids = {i for i, _, _ in self.images}
        self.annotations["images"] = [e for e in self.annotations["images"] if e["id"] in ids]
        self.annotations["annotations"] = [a for a in self.annotations["annotations"] if a["image_id"] in ids]
        self._inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.attention_layer = spec.get("attention_layer", -2)
        self.mass = float(spec.get("mass", attention_miou.MASS))
        if not 0.0 < self.mass <= 1.0:
            raise ConfigError(f"{key}.mass: expected a fraction in (0, 1], got {self.mass}")
        self.targets = None
        if spec.get("masks", None):
            try:
                self.targets = attention_miou.read_masks(spec.masks, [n for _, n, _ in self.images],
                                                         [im.shape[:2] for _, _, im in self.images])
            except ValueError as e:
                raise ConfigError(f"{key}.masks: {e}") from None

    def _model(self, state):
        if self.params == "student":
            return backbone_module(state.model())
        if not isinstance(state.extras, dict) or "teacher" not in state.extras:
            raise RuntimeError(f"evaluator {self.name!r}: params='teacher' but this task keeps no teacher extra")
        return backbone_module(state.model(params=state.extras["teacher"]))

    def run(self, state) -> dict[str, float]:
        from crate_jax.analysis import measure

        model = self._model(state)
        cfg = model.cfg
        layer = measure.check_layers([self.layer], cfg.depth)[0]
        if cfg.image_size not in self._inputs:
            self._inputs[cfg.image_size] = seg_inputs.model_inputs([im for _, _, im in self.images], cfg.image_size)
        display, normalized = self._inputs[cfg.image_size]
        _, feats = seg_inputs.features_and_attention(model, normalized, layer, self.batch_size)
        records = []
        for i, (image_id, _, image) in enumerate(self.images):
            masks = seg_inputs.maskcut_image(feats[i], cfg.grid, cfg.patch_size, image.shape[:2], display=display[i],
                                             crf=self.crf, n_masks=self.n_masks, tau=self.tau,
                                             solver=self.solver)
            records += coco_eval.result_records(image_id, masks)
        m = coco_eval.score(self.annotations, records)
        out = {f"{prefix}_{k}": m[t][k] for t, prefix in (("segm", "mask"), ("bbox", "box"))
               for k in ("AP", "AP50", "AP75")}
        out["masks_per_image"] = len(records) / max(1, len(self.images))
        if self.targets is not None:
            attn_layer = measure.check_layers([self.attention_layer], cfg.depth)[0]
            attn, _ = seg_inputs.features_and_attention(model, normalized, attn_layer, self.batch_size)
            a = attention_miou.score_attention(attn, self.targets, cfg.grid, cfg.patch_size, self.mass)
            out.update(attn_miou=a["miou"], attn_fg_iou=a["fg_iou"], attn_jaccard=a["jaccard"],
                       attn_best_head_fg_iou=a["best_head_fg_iou"])
        return out
