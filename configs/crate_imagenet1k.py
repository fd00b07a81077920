"""CRATE (the original white-box transformer) on ImageNet-1K, following the CRATE repo (docs/vision.md §Recipes).

RandomResizedCrop(224) + flip, label-smoothing 0.1, 20 warm-up epochs then cosine; no gradient clipping.
The README command for CRATE-T uses Lion (lr 2e-4, wd 0.05, batch 512, 200 epochs) — `opt=lion`; the
code's defaults are AdamW(0.9, 0.999), lr 4e-4, wd 0.1, batch 256, 90 epochs — `opt=adamw`. The torch
AdamW decays every parameter, hence `wd_mask='.*'`.

    python -m crate_jax.train --config configs/crate_imagenet1k.py:variant=T/16,opt=lion --workdir runs/crate_t16

Args: variant (T/S/B/L), opt=lion|adamw, pool=cls|mean, res, batch, epochs, data_dir, steps.
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args


def get_config(arg: str = ""):
    a = parse_args(arg, variant="T/16", model="crate", opt="lion", pool="cls", res=224, batch=0, epochs=0,
                   data_dir="", steps=0)
    lion = a.opt == "lion"
    batch = a.batch or (512 if lion else 256)
    epochs = a.epochs or (200 if lion else 90)
    c = base_config()
    c.res = a.res
    c.model = ConfigDict(dict(name=a.model, variant=a.variant, num_classes=1000, pool=a.pool) if a.model == "crate"
                         else dict(name=a.model, variant=a.variant, num_classes=1000))
    c.data = ConfigDict(dict(source="tfds", name="imagenet2012", data_dir=a.data_dir or None, train_split="train",
                             eval_split="validation", augment="inception_crop", area_min=8, flip=True, randaug=None))
    c.batch_size = batch
    c.eval_batch_size = batch
    c.evals.val = dict(type="classification", split="validation")
    c.num_epochs = epochs
    if a.steps:
        c.total_steps = a.steps
    steps_per_epoch = 1_281_167 // batch
    if lion:
        c.optim.update(name="lion", lr=2e-4, wd=0.05, b1=0.9, b2=0.99)
    else:
        c.optim.update(name="adamw", lr=4e-4, wd=0.1, b1=0.9, b2=0.999)
    c.optim.update(warmup_steps=20 * steps_per_epoch, min_lr=0.0, wd_mask=".*", clip=0.0)
    c.loss.label_smoothing = 0.1
    c.eval_every = steps_per_epoch
    return c
