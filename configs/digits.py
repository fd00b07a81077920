"""CRATE-α (or CRATE / ViT) on scikit-learn's handwritten digits: real 8×8 images, offline.

    python -m crate_jax.train --config configs/digits.py --workdir runs/digits
    python -m crate_jax.train --config configs/digits.py:model=vit --workdir runs/digits_vit

The digits are upsampled to 16×16 and cut into 4×4 patches (16 tokens + cls). The stratified
train/test split (80/20) is fixed by `data.split_seed`, independent of the training seed.
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import parse_args, base_config


def get_config(arg: str = ""):
    a = parse_args(arg, model="crate_alpha", variant="digits", steps=1000, batch=128)
    c = base_config()
    c.seed = 0
    c.res = 16
    widths = {"crate_alpha": "Ti/4", "crate": "T/4", "vit": "Ti/4"}
    variant = widths[a.model] if a.variant == "digits" else a.variant
    c.model = ConfigDict(dict(name=a.model, variant=variant, width=96, depth=4, num_heads=4, drop_path=0.1,
                              **({"mlp_dim": 384} if a.model == "vit" else {})))
    # Random crops of >= 80 % area (small shifts and zooms) are the augmentation; eval sees the whole image.
    c.data = ConfigDict(dict(source="digits", train_split="train", eval_split="test", augment="inception_crop",
                             area_min=80, resize_small=16, randaug=None, flip=False, digits_test_fraction=0.2,
                             split_seed=0))
    c.batch_size = int(a.batch)
    c.eval_batch_size = 360
    c.evals.val = dict(type="classification", split="test")
    c.total_steps = int(a.steps)
    c.optim.update(name="adamw", lr=2e-3, min_lr=1e-5, warmup_steps=60, b1=0.9, b2=0.95, wd=0.1, clip=1.0)
    c.loss.label_smoothing = 0.1
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    return c
