"""Transfer learning: fine-tune a pretrained backbone on CIFAR-10 / CIFAR-100 / Oxford Flowers-102 / Oxford-IIIT
Pets through TFDS, as in the CRATE paper's Table 1 (Yu et al. 2023) with the official recipe
(`Ma-Lab-Berkeley/CRATE` README fine-tuning table and `finetune.py`):

| dataset | TFDS name, train / eval split | classes | lr (AdamW) | epochs | batch |
|---|---|---|---|---|---|
| cifar10 | `cifar10`, train / test | 10 | 5e-5 | 200 | 256 |
| cifar100 | `cifar100`, train / test | 100 | 5e-5 | 200 | 256 |
| flowers102 | `oxford_flowers102`, train+validation / test | 102 | 1e-4 | 400 | 256 |
| pets | `oxford_iiit_pet`, train / test | 37 | 1e-4 | 400 | 256 |

224 px; AdamW (0.9, 0.999, eps 1e-8), weight decay 0.01 on every parameter (torch `AdamW` has no mask),
cosine decay to 0 without warm-up; train crop RandomResizedCrop (area 8–100 %) + flip + RandAugment(2, 14)
(torchvision's magnitude 14 of 31 bins is level 14/30, our timm-style magnitude 4.67); plain cross-entropy.
The official eval squashes to 224×224; ours resizes the short side to 224 and centre-crops (the same for
square images such as CIFAR). The classifier's new head, and for CRATE the LayerNorm before it (the
official code replaces `mlp_head` = LayerNorm + Linear), start fresh (`init.dont_load`).

`init=` is any backbone bundle or training workdir: a supervised classifier, a SimDINO student bundle or
run (`python -m crate_jax.ssl.bundles --workdir RUN --output DIR --teacher` writes the teacher's), or a
CRATE-MAE bundle or run (its encoder into a CRATE classifier, `crate_jax.models.backbones`). When `init`
is a local path, the classifier's structure (model, size, and for CRATE-MAE λ = 0.5 and the final eps) is
read from its `model.json`, so `model=` / `variant=` need not be given.

    python -m crate_jax.train --config configs/transfer.py:dataset=cifar10,init=bundles/crate_T16,data_dir=DIR \\
        --workdir runs/crate_t16_cifar10

Args: dataset, model, variant, init, res, batch, epochs (0: the table's), lr (0: the table's), steps,
data_dir, fsdp, tensor.
"""

import json
import os

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args

DATASETS = {  # name -> (TFDS name, train split, eval split, lr, epochs)
    "cifar10": ("cifar10", "train", "test", 5e-5, 200),
    "cifar100": ("cifar100", "train", "test", 5e-5, 200),
    "flowers102": ("oxford_flowers102", "train+validation", "test", 1e-4, 400),
    "pets": ("oxford_iiit_pet", "train", "test", 1e-4, 400),
}
STRUCTURE = ("model", "variant", "width", "depth", "num_heads", "patch_size", "mlp_dim", "pool", "posemb", "eta",
             "lmbda", "odl_ratio", "odl_steps", "odl_decoupled", "odl_residual", "ln_eps", "final_ln_eps",
             "stem_bias", "attn_out_bias")


def backbone_structure(init: str) -> dict:
    """The classifier fields that match the backbone in `init`'s model.json ({} if it has none here)."""
    path = os.path.join(init, "model.json") if init and "://" not in init else ""
    if not path or not os.path.isfile(path):
        return {}
    meta = json.loads(open(path).read())
    kind, cfg = meta.get("kind"), meta.get("config", {})
    if kind == "crate_mae":
        from crate_jax.models.backbones import mae_classifier_overrides
        return dict(mae_classifier_overrides(cfg), variant=cfg["variant"])
    if kind == "self_distill":
        cfg = cfg["backbone"]
    if kind in ("self_distill", "classifier"):
        return {k: cfg[k] for k in STRUCTURE if k in cfg}
    return {}


def get_config(arg: str = ""):
    a = parse_args(arg, dataset="cifar10", model="crate", variant="T/16", init="", res=224, batch=256, epochs=0,
                   lr=0.0, steps=0, data_dir="", fsdp=1, tensor=1)
    if a.dataset not in DATASETS:
        raise ValueError(f"dataset={a.dataset!r}: expected one of {sorted(DATASETS)}")
    name, train_split, eval_split, lr, epochs = DATASETS[a.dataset]
    c = base_config()
    c.res = a.res
    structure = backbone_structure(a.init)
    m = dict(name=structure.pop("model", a.model), variant=structure.pop("variant", a.variant), num_classes=None)
    m.update(structure)
    c.model = ConfigDict(m)
    c.data = ConfigDict(dict(source="tfds", name=name, data_dir=a.data_dir or None, train_split=train_split,
                             eval_split=eval_split, augment="inception_crop", area_min=8, flip=True,
                             randaug=(2, 14 * 10 / 30), resize_small=a.res))
    c.mesh.update(data=-1, fsdp=a.fsdp, tensor=a.tensor)
    c.batch_size = a.batch
    c.eval_batch_size = a.batch
    c.evals.val = dict(type="classification", split=eval_split)
    c.num_epochs = a.epochs or epochs
    if a.steps:
        c.total_steps = a.steps
    c.optim.update(name="adamw", lr=a.lr or lr, min_lr=0.0, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, wd=0.01,
                   wd_mask=".*", clip=0.0)
    c.loss.label_smoothing = 0.0
    head = r"(head|encoder_norm)/.*" if c.model.name == "crate" else r"head/.*"
    c.init.update(checkpoint=a.init or None, dont_load=head, posemb_resample="2d")
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
