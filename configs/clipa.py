"""CLIPA image-text training with a CRATE-α image tower (docs/math.md §CLIPA; docs/clipa.md §Recipes).

Two stages, one file:

* `stage=pretrain` (docs/clipa.md §Recipes): 84 px images (6×6 patches + cls at L/14) and 32-token captions,
  global batch 32,768, 78,196 steps, lr 1.024e-3 with 1,600 warm-up steps and cosine decay to 0,
  wd 0.2 on kernels only, Adam(0.9, 0.95) with a bfloat16 first moment, grad-clip 1.0, global-batch
  contrastive loss. The text tower (H: 1024 wide, 24 deep) and the temperature are **frozen** and
  come from an existing two-tower checkpoint (`init=`; everything under `img/` stays freshly
  initialised). Only the image tower trains.
* `stage=finetune` (docs/clipa.md §Recipes): 224 px, 15,639 steps, lr 5.12e-5, 800 warm-up steps, initialised
  from the pre-training run (`init=` its workdir) with the image position embedding interpolated
  along the flattened token axis (CLIPA's 1-D mode, 37 → 257 rows; `posemb=2d` for the grid mode).

Commands (TPU pod; see launch/README.md for create/setup and the bucket layout). Pre-training
CRATE-α-L/14, then fine-tuning; `$BUCKET/clipa_text_h.bundle` is a two-tower bundle holding a
pre-trained text tower, e.g. imported with `python -m crate_jax.convert --format clipa-jax --input
CLIPA_CHECKPOINT.npz --output clipa_text_h.bundle` and copied to the bucket:

    python launch/tpu_vm.py run $NAME --accelerator-type v5p-128 \\
      --config "configs/clipa.py:variant=L/14,stage=pretrain,res=84,txt_len=32,shards=$BUCKET/datacomp/{00000..12799}.tar,vocab=$BUCKET/vocab.txt,init=$BUCKET/clipa_text_h.bundle" \\
      --workdir $BUCKET/runs/clipa_l14_pretrain
    python launch/tpu_vm.py run $NAME --accelerator-type v5p-128 \\
      --config "configs/clipa.py:variant=L/14,stage=finetune,res=224,txt_len=32,shards=$BUCKET/datacomp/{00000..12799}.tar,vocab=$BUCKET/vocab.txt,init=$BUCKET/runs/clipa_l14_pretrain" \\
      --workdir $BUCKET/runs/clipa_l14_finetune

H/14: the same two commands with `variant=H/14` (and their own workdirs). ImageNet zero-shot runs
at every evaluation when `imagenet2012` is prepared for TFDS (`imagenet_dir=` its data_dir;
skipped with a message otherwise); `eval_shards=PATTERN` adds image↔text retrieval on held-out
shards. Any other value: `--config.KEY=VALUE` (e.g. `--config.total_steps=200` for a timing run).

Arguments (defaults reproduce the recipe): variant, stage, res (0: pretrain 6 x patch, i.e. 84 px at /14 and
96 px at /16; finetune 224),
txt_len, shards, tfds (a TFDS directory with jpg/txt instead of shards), vocab, vocab_size,
init, model (crate_alpha | crate | vit), text (mu | Ti | S | B | L | H), text_model
(transformer | crate | crate_alpha), freeze_text, steps, batch, lr, warmup, width/depth/heads
(image tower size overrides, 0 = the variant's), out_dim, mask_ratio, loss (softmax | sigmoid),
eval_shards, imagenet_dir, crop_min (smallest inception-crop area in %, CLIPA: 40), text_pool
(last | cls | eos), pad_mask, temperature (initial logit scale exp(t); 0: 1/0.07, or 10 for
sigmoid), synth (a directory written by `crate_jax.data.image_text.synth_scenes`: its
train shards, vocab, and zero-shot / retrieval evals on its held-out shards), posemb (1d | 2d), fsdp and
remat (0 / '': the variant's planned layout, `PLANNED`: FSDP groups of 8 chips with data parallelism across
them; -1: every device on the fsdp axis, the default of unplanned variants; on fewer than 8 devices pass
fsdp=-1 or 1).
The demo (`python -m crate_jax.demos.clipa`) runs this file with small values of these.
"""

import json
import math
import os

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args

# (variant, stage) -> (fsdp, image-tower remat) that `aot --plan --topology v5p-128` ranked first at the stage's
# batch (bench/RESULTS.md "A plan per recipe"; bench/plans/clipa_*__v5p-128.json): remat dots, compute-bound
# (B/16 53.8 ms, L/14 134.9 ms, H/14 256.8 ms; fsdp 64 ties), where saving everything is memory-bound and full
# remat recomputes; the fine-tunes (224 px) on every device's fsdp axis with remat dots, B/16 196.9 ms and L/14
# 830.8 ms (78.7 of 95 GiB; all splits tie).
PLANNED = {("B/16", "pretrain"): (8, "dots"), ("L/14", "pretrain"): (8, "dots"), ("H/14", "pretrain"): (8, "dots"),
           ("B/16", "finetune"): (-1, "dots"), ("L/14", "finetune"): (-1, "dots")}

STAGES = {  # docs/clipa.md §Recipes
    "pretrain": dict(res=0, steps=78_196, lr=1.024e-3, warmup=1_600),  # res 0: 6 x patch (84 px at /14)
    "finetune": dict(res=224, steps=15_639, lr=5.12e-5, warmup=800),
}


def get_config(arg: str = ""):
    a = parse_args(arg, variant="L/14", stage="pretrain", res=0, txt_len=32, shards="", tfds="", vocab="",
                   vocab_size=32_000, init="", model="crate_alpha", text="H", text_model="transformer",
                   freeze_text=True, steps=0, batch=32_768, lr=0.0, warmup=-1, width=0, depth=0, heads=0,
                   out_dim=0, mask_ratio=0.0, loss="softmax", eval_shards="", imagenet_dir="", synth="",
                   posemb="1d", eval_batch=0, log_every=50, eval_every=0, text_pool="last", pad_mask=False,
                   crop_min=40.0, temperature=0.0, fsdp=0, remat="")
    if a.stage not in STAGES:
        raise ValueError(f"stage={a.stage!r}: expected one of {sorted(STAGES)}")
    stage = STAGES[a.stage]
    c = base_config()
    c.task = "clip"
    c.seed = 0
    patch = int(a.variant.split("/")[1]) if "/" in a.variant else 14
    # CLIPA pre-trains L/14 and H/14 at 84 px: a 6 x 6 patch grid. Other patch sizes keep the grid (B/16: 96 px).
    c.res = a.res or stage["res"] or 6 * patch
    c.txt_len = a.txt_len
    c.batch_size = a.batch
    c.total_steps = a.steps or stage["steps"]
    sized = bool(a.width or a.depth or a.heads)  # a tower sized by hand (the demo's, the tests'): no pod defaults
    tower = "" if sized else a.variant.split("/")[0]
    big = tower in ("L", "H", "g", "G", "e")
    # A pod-sized tower (B and up, no width/depth/heads override) computes in bfloat16 over float32 parameters and
    # scans its blocks (one block compiled); the small towers of the demo and tests stay float32 and unrolled.
    pod = big or tower == "B"
    # The layout `aot --plan` ranked first on a v5p-128 (PLANNED); else ZeRO-3 over every device (fsdp=-1: it
    # also runs on one device) with full per-block remat for the big towers (docs/math.md §CLIPA).
    planned = None if sized else PLANNED.get((a.variant, a.stage))
    fsdp, remat = planned or (-1, "full" if big else "none")
    fsdp, remat = a.fsdp or fsdp, a.remat or remat
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1) if fsdp == -1 else dict(data=-1, fsdp=fsdp, tensor=1))
    image = dict(name=a.model, variant=a.variant, dtype="bfloat16" if pod else "float32", remat=remat, scan=pod)
    image.update({k: v for k, v in dict(width=a.width, depth=a.depth, num_heads=a.heads).items() if v})
    text = dict(variant=a.text, model=a.text_model, vocab_size=a.vocab_size, pool=a.text_pool, pad_mask=a.pad_mask,
                dtype="bfloat16" if pod else "float32", scan=a.text in ("L", "H"))
    c.model = ConfigDict(dict(image=image, text=text, out_dim=a.out_dim, loss=a.loss, mask_ratio=a.mask_ratio,
                              temperature_init=a.temperature or None))

    c.data = ConfigDict(dict(source="tfds" if a.tfds else "shards", shards=a.shards, tfds_dir=a.tfds or None,
                             tfds_split="full", vocab=a.vocab, shuffle_buffer=10_000, cycle_length=4,
                             area_min=a.crop_min, area_max=100.0, num_threads=None, prefetch=2, fast_decode=False))

    c.optim.update(name="adamw", lr=a.lr or stage["lr"], min_lr=0.0,
                   warmup_steps=a.warmup if a.warmup >= 0 else stage["warmup"], b1=0.9, b2=0.95,
                   mu_dtype="bfloat16", wd=0.2, wd_mask=r".*/kernel", clip=1.0,
                   freeze=["t", "txt/.*"] if a.freeze_text else [])
    if a.stage == "pretrain":  # text tower and t from an existing two-tower checkpoint, image tower fresh
        c.init = ConfigDict(dict(checkpoint=a.init or None, dont_load=r"img/.*", posemb_resample=a.posemb))
    else:  # everything from the pre-training run, image posemb resampled 84 -> 224 px
        c.init = ConfigDict(dict(checkpoint=a.init or None, dont_load=None, posemb_resample=a.posemb))

    c.eval_batch_size = a.eval_batch or min(a.batch, 1024)
    zeroshot, retrieval = {}, {}  # name -> evaluator spec; zero-shot ones run first
    imagenet = dict(type="zeroshot", source="tfds", name="imagenet2012", data_dir=a.imagenet_dir or None,
                    split="validation", classnames="imagenet_classnames.txt", templates="imagenet_templates.txt",
                    skip_if_missing=True)
    if not a.synth:
        zeroshot["imagenet"] = imagenet
    if a.eval_shards:
        retrieval["heldout"] = dict(type="retrieval", source="shards", shards=a.eval_shards)
    if a.synth:
        info_path = os.path.join(a.synth, "classes.json")
        if not os.path.isfile(info_path):
            raise ValueError(f"synth={a.synth}: {info_path} not found; generate the scenes first with "
                             f"python -m crate_jax.data.image_text.synth_scenes --out {a.synth}")
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        c.data.shards = c.data.shards or os.path.join(a.synth, info["train_pattern"])
        c.data.vocab = c.data.vocab or os.path.join(a.synth, info["vocab"])
        if not os.path.isfile(c.data.vocab):
            from crate_jax.data.image_text.synth_scenes import vocab_command
            raise ValueError(f"synth={a.synth}: vocab {c.data.vocab} not found; the scene generator writes only "
                             f"the captions: train the vocab on them first with {vocab_command(a.synth)}")
        with open(c.data.vocab, encoding="utf-8") as f:
            n_vocab = sum(1 for _ in f)
        c.model.text.vocab_size = int(math.ceil(n_vocab / 64) * 64)
        c.data.shuffle_buffer = 2_000
        eval_pattern = os.path.join(a.synth, info["eval_pattern"])
        zeroshot["synth"] = dict(type="zeroshot", source="shards", shards=eval_pattern,
                                 label_key=info.get("label_key", "label"), classnames=info_path,
                                 templates=os.path.join(a.synth, "templates.txt"))
        retrieval["synth_retrieval"] = dict(type="retrieval", source="shards", shards=eval_pattern)
    c.evals = ConfigDict({**zeroshot, **retrieval})

    c.log_every = a.log_every
    c.eval_every = a.eval_every or (2_000 if a.stage == "pretrain" else 1_000)
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    return c
