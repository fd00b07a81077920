"""CRATE-α ImageNet-21K pre-training (docs/vision.md §Recipes).

19,167 classes (winter-2021 release, a TFDS `imagenet21k` prepared in DATA_DIR), 224 px, batch 4096,
lr 5e-5 × 4096/256 = 8e-4 → 1e-6 cosine, 10 warm-up epochs, 91 epochs, wd 0.1 on kernels only,
Adam(0.9, 0.95) with a bf16 first moment, clip 1.0, mixup/cutmix every step, Inception crop + flip.

    python -m crate_jax.train --config configs/imagenet21k.py:variant=B/16,data_dir=gs://BUCKET/tfds \\
        --workdir gs://BUCKET/runs/crate_alpha_b16_in21k
    # TPU pod (see launch/README.md):
    python launch/tpu_vm.py run crate-in21k --zone us-east5-a --project PROJECT --accelerator-type v5p-128 \\
        --config configs/imagenet21k.py:variant=L/14,data_dir=gs://BUCKET/tfds --workdir gs://BUCKET/runs/l14_in21k

Args: variant (default L/14), model=crate_alpha|crate|vit, res, batch, epochs, data_dir, fsdp, tensor, remat
(none | dots | full). `fsdp` and `remat` default to the layout `python -m crate_jax.aot --plan` chose on a v5p-128
where one was measured (`PLANNED`, bench/RESULTS.md "A plan per recipe"), else data parallelism with full remat;
on a machine with fewer than 8 devices, pass fsdp=1. The planned remat none keeps every activation of 64 images
a chip (5 GiB for B/16, 52 GiB for L/8 on a v5p); with many more images a device (a GPU node at batch 4,096),
pass remat=full.
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args

# variant -> (fsdp, remat) chosen by `aot --plan --topology v5p-128` at batch 4096 (bench/RESULTS.md): with MSSA's
# TPU kernel no score matrix is saved, so remat none fits and is compute-bound (B/16 21.7 ms, L/14 100.2 ms, L/8
# 327.2 ms; fsdp 64 and data 8 x fsdp 8 tie, the groups of 8 match the other recipes)
PLANNED = {"B/16": (8, "none"), "L/14": (8, "none"), "L/8": (8, "none")}


def get_config(arg: str = ""):
    a = parse_args(arg, variant="L/14", model="crate_alpha", res=224, batch=4096, epochs=91, data_dir="",
                   fsdp=0, tensor=1, steps=0, remat="")
    fsdp, remat = PLANNED.get(a.variant, (1, "full"))
    fsdp, remat = a.fsdp or fsdp, a.remat or remat
    c = base_config()
    c.res = a.res
    c.model = ConfigDict(dict(name=a.model, variant=a.variant, num_classes=19_167, dtype="bfloat16", remat=remat,
                              scan=True))  # the winter-2021 release (docs/vision.md §Recipes)
    c.data = ConfigDict(dict(source="tfds", name="imagenet21k", data_dir=a.data_dir or None,
                             train_split="train[:100%]", eval_split=None, augment="inception_crop", area_min=8,
                             flip=True, randaug=None))
    c.mesh.update(data=-1, fsdp=fsdp, tensor=a.tensor)
    c.batch_size = a.batch
    c.num_epochs = a.epochs
    if a.steps:
        c.total_steps = a.steps
    steps_per_epoch = 13_151_276 // a.batch  # winter-2021 train split (19,167 classes)
    c.optim.update(name="adamw", lr=5e-5 * a.batch / 256, min_lr=1e-6, warmup_steps=10 * steps_per_epoch, b1=0.9,
                   b2=0.95, mu_dtype="bfloat16", wd=0.1, wd_mask=r".*kernel", clip=1.0)
    c.loss.update(label_smoothing=0.0)
    c.loss.mixup.update(enabled=True, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    c.log_every = 100
    c.checkpoint_every = 2000
    c.keep_period = 20_000
    return c
