"""Scaling curves of CRATE-α (sizes × patch sizes) and the paper's efficient-scaling recipe.

Two modes share one set of arguments:

* `mode=in21k` — the real grid: ImageNet-21K pre-training (docs/vision.md §Recipes), and with `stage=finetune`
  ImageNet-1K fine-tuning from a pre-trained checkpoint (docs/vision.md §Recipes), 224 px.
* `mode=digits` — the same grid shrunk to run on two CPU cores: scikit-learn's digits at 16 px,
  patch 4 or 8, each size letter mapped to a small width/depth (`DIGITS_SIZES`), ~100 steps.

Arguments (`configs/scaling.py:KEY=VALUE,...`): `mode`, `model` (crate_alpha | vit), `variant`
(default L/32, digits S/4; in digits mode the letter picks a row of `DIGITS_SIZES`), `patch`
(overrides the variant's patch; 0 keeps it), `stage` (pretrain | finetune), `init` (the checkpoint or workdir to fine-tune
from), `res`, `steps`, `batch` (0 = the mode's default), `minival` (in21k: held-out training images
evaluated as `eval/minival/*`; 0 = none), `data_dir` (TFDS data dir).

The efficient-scaling recipe (CRATE-α paper: pre-train with large patches, which costs few tokens,
then fine-tune with small ones; `crate_jax/train/pretrained.py` bilinearly resizes `embedding/kernel`
and resamples `pos_embedding` on the 2-D grid):

    python -m crate_jax.train --config configs/scaling.py:variant=L/32 --workdir gs://B/in21k_l32
    python -m crate_jax.train --config configs/scaling.py:variant=L/32,stage=finetune,patch=14,init=gs://B/in21k_l32 \
        --workdir gs://B/in1k_l14_from_l32            # or patch=8 for L/8

The digits sweep (the figure `docs/scaling_digits.png`):

    R=runs/scaling_digits
    python -m crate_jax.sweep --config configs/scaling.py:mode=digits,steps=300 \
        --grid variant=Ti,S,B,L --grid patch=8,4 --workdir $R --no-plot
    python -m crate_jax.sweep --config configs/scaling.py:mode=digits,variant=L,stage=finetune,steps=100,init=$R/variant_L--patch_8 \
        --grid patch=4 --tag recipe --workdir $R --summary-out docs/scaling_digits.png

The second command fine-tunes the patch-8 L run at patch 4, then plots all nine runs; both take about
20 minutes on two busy CPU cores. On these 8×8 digits upsampled to 16 px, patch 8 beats patch 4 at
this budget (patch 4 overfits the 1,437 training images: lower training loss, lower test accuracy),
the reverse of the paper's ImageNet trend. The figure demonstrates the pipeline, not the paper's result.

Check that a point fits its TPU slice before paying for it (measured: 31.4 of 95 GiB per chip, 46.1
TFLOP per chip per step; L/8 fine-tuning at batch 4096: 88.9 GiB, tight):

    python -m crate_jax.aot --config configs/scaling.py:variant=L/14 --topology v5p-128
    python -m crate_jax.aot --config configs/scaling.py:variant=L/8,stage=finetune,init=unused --topology v5p-128
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args

# Size letter -> (width, depth, heads) for the digits mode: the same ordering as the real sizes,
# small enough for ~100 steps in well under a minute on a CPU.
DIGITS_SIZES = {"Ti": (32, 2, 2), "S": (48, 3, 3), "B": (64, 4, 4), "L": (96, 4, 4)}

# ImageNet-21K, winter-2021 release (the one the official configs read): 19,167 classes (docs/vision.md §Recipes),
# ~13.15 M images (an approximate public figure; it only sets the schedule length, so pass `steps=`
# to pin it). ImageNet-1K train has 1,281,167 images.
IN21K_CLASSES, IN21K_IMAGES = 19_167, 13_153_500
IN1K_CLASSES, IN1K_IMAGES = 1_000, 1_281_167

MODES, STAGES, MODELS = ("in21k", "digits"), ("pretrain", "finetune"), ("crate_alpha", "vit")


def _variant(a) -> tuple[str, str, int]:
    """(size letter, 'S/16'-style variant with the patch override applied, patch). Without a patch in the
    variant or `patch=`, the patch is 16 (in21k) or 4 (digits)."""
    size, _, patch = (a.variant or ("S/4" if a.mode == "digits" else "L/32")).partition("/")
    patch = int(a.patch) or int(patch or (4 if a.mode == "digits" else 16))
    return size, f"{size}/{patch}", patch


def _check(a) -> None:
    for key, allowed in (("mode", MODES), ("stage", STAGES), ("model", MODELS)):
        if a[key] not in allowed:
            raise ValueError(f"configs/scaling.py: {key}={a[key]!r}; expected one of {allowed}")
    if a.stage == "finetune" and not a.init:
        raise ValueError("configs/scaling.py: stage=finetune needs init=PATH (the pre-training workdir or bundle)")
    size = _variant(a)[0]
    if a.mode == "digits" and size not in DIGITS_SIZES:
        raise ValueError(f"configs/scaling.py: mode=digits knows the sizes {sorted(DIGITS_SIZES)}, got "
                         f"variant={a.variant!r}")


def get_config(arg: str = ""):
    a = parse_args(arg, mode="in21k", model="crate_alpha", variant="", patch=0, stage="pretrain", init="",
                   res=0, steps=0, batch=0, minival=51_200, data_dir="")
    _check(a)
    size, variant, _ = _variant(a)
    c = base_config()
    c.seed = 0
    return _digits(c, a, size, variant) if a.mode == "digits" else _imagenet(c, a, variant)


def _digits(c, a, size, variant):
    width, depth, heads = DIGITS_SIZES[size]
    c.res = int(a.res) or 16
    c.model = ConfigDict(dict(name=a.model, variant=variant, width=width, depth=depth, num_heads=heads,
                              num_classes=10, **({"mlp_dim": 4 * width} if a.model == "vit" else {})))
    c.data = ConfigDict(dict(source="digits", train_split="train", eval_split="test", augment="none",
                             randaug=None, flip=False, digits_test_fraction=0.2, split_seed=0))
    c.batch_size = int(a.batch) or 128
    c.eval_batch_size = 360
    c.evals.val = dict(type="classification", split="test")
    c.total_steps = int(a.steps) or 100
    c.optim.update(name="adamw", lr=2e-3 if a.stage == "pretrain" else 1e-3, min_lr=1e-5,
                   warmup_steps=max(1, c.total_steps // 10), b1=0.9, b2=0.95, wd=0.05, clip=1.0)
    c.log_every = max(1, c.total_steps // 20)
    c.eval_every = 0  # one evaluation, at the end
    c.checkpoint_every = c.total_steps
    c.keep_checkpoints = 1
    if a.stage == "finetune":
        c.init.update(checkpoint=a.init, dont_load=r"head/.*", posemb_resample="2d")
    return c


def _imagenet(c, a, variant):
    pretrain = a.stage == "pretrain"
    c.res = int(a.res) or 224
    classes = IN21K_CLASSES if pretrain else IN1K_CLASSES
    c.model = ConfigDict(dict(name=a.model, variant=variant, num_classes=classes,
                              **({"mlp_dim": 4 * _vit_width(variant)} if a.model == "vit" else {})))
    c.batch_size = int(a.batch) or 4096
    data_dir = a.data_dir or None
    if pretrain:
        minival = int(a.minival)
        c.data = ConfigDict(dict(source="tfds", name="imagenet21k", data_dir=data_dir,
                                 train_split=f"train[{minival}:]" if minival else "train",
                                 eval_split=f"train[:{minival}]" if minival else None,
                                 augment="inception_crop", area_min=8.0, flip=True, randaug=None))
        if minival:
            c.evals.minival = dict(type="classification", split=f"train[:{minival}]")
        images, epochs, lr = IN21K_IMAGES - minival, 91, 8e-4
        c.loss.update(on_value=1.0, off_value=0.0)
    else:
        c.data = ConfigDict(dict(source="tfds", name="imagenet2012", data_dir=data_dir, train_split="train",
                                 eval_split="validation", augment="inception_crop", area_min=8.0, flip=True,
                                 randaug=(2, 9)))
        c.evals.val = dict(type="classification", split="validation")
        images, epochs, lr = IN1K_IMAGES, 91, 1.6e-4
        c.loss.update(on_value=0.9, off_value=1e-4)
        c.init.update(checkpoint=a.init, dont_load=r"head/.*", posemb_resample="2d")
    c.loss.mixup.enabled = True  # on-device mixup / cutmix every step in both stages (docs/vision.md §Recipes)
    steps_per_epoch = images / c.batch_size
    c.total_steps = int(a.steps) or int(epochs * steps_per_epoch)
    c.optim.update(name="adamw", lr=lr, min_lr=1e-6, warmup_steps=int(10 * steps_per_epoch), b1=0.9, b2=0.95,
                   mu_dtype="bfloat16", wd=0.1, clip=1.0)
    c.eval_batch_size = 1024
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 1000
    return c


def _vit_width(variant: str) -> int:
    from crate_jax.models.config import VIT_VARIANTS
    return VIT_VARIANTS[variant.partition("/")[0]][0]
