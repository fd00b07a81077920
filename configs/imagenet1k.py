"""CRATE-α ImageNet-1K fine-tuning from an ImageNet-21K checkpoint (docs/vision.md §Recipes).

1000 classes, 224 px, lr 1e-5 × 16 = 1.6e-4 → 1e-6 cosine, 10 warm-up epochs, 91 epochs, RandAugment(2, 9)
after the flip, one-hot on 0.9 / off 1e-4 (big_vision's label smoothing), mixup/cutmix. The head is
re-initialised; `embedding/kernel` is bilinearly resized when the patch size changes (e.g. B/32 → B/16)
and the position embedding is resampled on the 2-D grid.

    python -m crate_jax.train --config configs/imagenet1k.py:variant=B/16,init=gs://BUCKET/runs/b32_in21k,data_dir=gs://BUCKET/tfds \\
        --workdir gs://BUCKET/runs/b16_in1k

Args: variant, model, res, batch, epochs, init (bundle dir or training workdir), data_dir, fsdp, tensor, steps,
remat (none | dots | full). `fsdp` and `remat` default to the layout `python -m crate_jax.aot --plan` ranked
first on a v5p-128 where one was measured (`PLANNED`: FSDP groups of 8 chips, data parallel across, no remat;
bench/RESULTS.md "A plan per recipe"), else 1 (data parallelism) and full remat; on a machine with fewer than
8 devices, pass fsdp=1, and remat=full with many more than the plan's 64 images a device (a GPU node).
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args


# variant -> (fsdp, remat) chosen by `aot --plan --topology v5p-128` at batch 4096 (bench/plans/in1k_ft_*.json;
# remat none, compute-bound at 100.2 ms with MSSA's TPU kernel; fsdp 64 ties)
PLANNED = {"L/14": (8, "none")}


def get_config(arg: str = ""):
    a = parse_args(arg, variant="L/14", model="crate_alpha", res=224, batch=4096, epochs=91, init="", data_dir="",
                   fsdp=0, tensor=1, steps=0, remat="")
    fsdp, remat = PLANNED.get(a.variant, (1, "full"))
    c = base_config()
    c.res = a.res
    c.model = ConfigDict(dict(name=a.model, variant=a.variant, num_classes=1000, dtype="bfloat16",
                              remat=a.remat or remat, scan=True))
    c.data = ConfigDict(dict(source="tfds", name="imagenet2012", data_dir=a.data_dir or None, train_split="train",
                             eval_split="validation", augment="inception_crop", area_min=8, flip=True,
                             randaug=(2, 9), resize_small=256 * a.res // 224))
    c.mesh.update(data=-1, fsdp=a.fsdp or fsdp, tensor=a.tensor)
    c.batch_size = a.batch
    c.eval_batch_size = a.batch
    c.evals.val = dict(type="classification", split="validation")
    c.num_epochs = a.epochs
    if a.steps:
        c.total_steps = a.steps
    steps_per_epoch = 1_281_167 // a.batch
    c.optim.update(name="adamw", lr=1e-5 * 16, min_lr=1e-6, warmup_steps=10 * steps_per_epoch, b1=0.9, b2=0.95,
                   mu_dtype="bfloat16", wd=0.1, wd_mask=r".*kernel", clip=1.0)
    c.loss.update(on_value=0.9, off_value=1e-4)
    c.loss.mixup.update(enabled=True, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    c.init.update(checkpoint=a.init or None, dont_load=r"head/.*", posemb_resample="2d")
    c.eval_every = 2 * steps_per_epoch
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
