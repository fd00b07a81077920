"""SimDINO self-distillation on ImageNet-1K (Wu et al. 2025, "Simplifying DINO via Coding Rate
Regularization", arXiv 2502.10385), with a ViT, CRATE or CRATE-α backbone.

The recipe is the official code's (`RobinWu218/SimDINO`, `simdino/main_dino.py` defaults and the README's
ViT-B/16 command `--local_crops_number 10 --eps 0.05 --coeff 1`, 8 GPUs × 64 images):

* 2 global crops at 224 px (area 40–100 %) and 10 local crops at 96 px (area 5–40 %), flip, colour
  jitter (p 0.8: 0.4/0.4/0.2/0.1), grayscale (p 0.2), blur (p 1.0 / 0.1 / 0.5), solarise (p 0.2, second
  global view) — `crate_jax.data.images.multicrop`;
* DINO head 2048 → 2048 → 256, L2-normalised, no prototypes, no centring;
* loss `−cos − γ·R` with the coding rate over the **global** batch, ε² = 0.05 (the official `--eps`),
  γ = (p + M)/(p M), expansion on the mean of student and teacher global views (`expa_type=1`);
* teacher EMA 0.996 → 1 (cosine, per step); student drop-path 0.1;
* AdamW (0.9, 0.999), global batch 512, lr 5e-4 × 512/256 = 1e-3 after 10 warm-up epochs, cosine to 1e-6,
  weight decay 0.04 → 0.4 (cosine) on every weight except biases and norms, per-parameter gradient clipping
  at 3.0 (DINO's `clip_gradients`), 100 epochs;
* evaluation: weighted 20-NN (T 0.07) and the linear probe (`crate_jax.probe`) on the teacher.

With `loss=dino` the same run is classic DINO, SimDINO's baseline (`crate_jax.ssl.dino_loss`): a head
to `out_dim` (65536) weight-normalised prototypes (`norm_last_layer`), teacher centring (EMA 0.9), teacher
temperature 0.04 → `teacher_temp` (0.07) over `warmup_teacher_temp_epochs` (30) epochs, student temperature
0.1, the last layer frozen for the first epoch. `official_vit=1` builds the ViT as the official code does
(trunc-normal init, erf GELU, torch-bicubic local-crop position tables: `init`, `gelu`, `pos_resize` of
`crate_jax.models.config`); the default is the big_vision-style ViT. The schedules follow DINO's
`cosine_scheduler` grid (`optim.dino_schedule`).

fp16 autocast becomes bfloat16 compute over float32 parameters: `dtype=auto` (the default) is bfloat16 on the
ImageNet source and float32 on the offline ones (`digits`, `mnist`: CPU runs); the loss's log-determinant stays
float32 (`loss.logdet_dtype`). Not reproduced: `torch.compile`; Adam's
bias correction of the frozen DINO last layer counts from step 0, torch's from its first update. The
paper's text could not be read from this workplace; where it and the code differ, the code is what this
file follows.

    python -m crate_jax.train --config configs/simdino.py:model=vit,variant=B/16,data_dir=gs://BUCKET/tfds \\
        --workdir gs://BUCKET/runs/simdino_vitb16
    # TPU pod (see launch/README.md); CRATE-α backbone:
    python launch/tpu_vm.py run simdino --zone us-east5-a --project PROJECT --accelerator-type v5p-64 \\
        --config configs/simdino.py:model=crate_alpha,variant=B/16,data_dir=gs://BUCKET/tfds \\
        --workdir gs://BUCKET/runs/simdino_crate_alpha_b16

Args: model (vit | crate | crate_alpha), variant, batch, epochs, steps (overrides epochs), lr (the base
lr per 256 images), global_size, local_size, n_local, eps_sq, source (tfds | digits | mnist), name (TFDS
dataset), data_dir, fsdp, tensor, dtype, loss (simdino | dino), out_dim, teacher_temp,
warmup_teacher_temp_epochs (DINO), official_vit (0 | 1). `fsdp` (0) defaults to the layout `python -m
crate_jax.aot --plan` ranked first on a v5p-128 where one was measured (`PLANNED`, measured with the CRATE-α
backbone in bfloat16: B/16 in FSDP groups of 8 chips, data parallel across, 12.2 ms a step at the roofline,
compute-bound, against 16.3 for data parallelism; bench/RESULTS.md "A plan per recipe"), else 1; with fewer than
8 devices, pass fsdp=1.
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import auto_dtype, base_config, parse_args


# variant -> fsdp chosen by `aot --plan --topology v5p-128` at batch 512 in bfloat16
# (bench/plans/simdino_B16__v5p-128.json)
PLANNED = {"B/16": 8}


def get_config(arg: str = ""):
    a = parse_args(arg, model="vit", variant="B/16", batch=512, epochs=100, steps=0, lr=5e-4, global_size=224,
                   local_size=96, n_local=10, eps_sq=0.05, source="tfds", name="imagenet2012", data_dir="", fsdp=0,
                   tensor=1, dtype="auto", loss="simdino", out_dim=65536, teacher_temp=0.07,
                   warmup_teacher_temp_epochs=30, official_vit=0)
    if a.loss not in ("simdino", "dino"):
        raise ValueError(f"configs/simdino.py: loss={a.loss!r}, expected simdino or dino")
    c = base_config()
    c.task = "simdino"
    c.model = ConfigDict(dict(name=a.model, variant=a.variant, head_hidden=2048, head_dim=256, head_layers=3,
                              drop_path=0.1, dtype=auto_dtype(a.dtype, a.source)))
    if a.official_vit:  # the official DINO / SimDINO ViT: its init, the erf GELU, its local-crop table resampling
        c.model.update(init="dino", gelu="erf", pos_resize="dino")
    # one epoch of ImageNet (1,281,167 images); with steps=N, one of `epochs` equal parts of the run
    epoch = max(1, a.steps // a.epochs) if a.steps else max(1, 1_281_167 // a.batch)
    if a.loss == "dino":
        c.model.update(prototypes=a.out_dim, norm_last_layer=True)
    c.crops = ConfigDict(dict(global_size=a.global_size, local_size=a.local_size, n_local=a.n_local,
                              global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), flip=True, jitter_prob=0.8,
                              brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2,
                              blur_probs=(1.0, 0.1, 0.5), blur_radius=(0.1, 2.0), solarize_probs=(0.0, 0.2, 0.0)))
    if a.loss == "dino":
        c.loss = ConfigDict(dict(name="dino", teacher_temp=a.teacher_temp, warmup_teacher_temp=0.04,
                                 warmup_teacher_temp_epochs=min(a.warmup_teacher_temp_epochs, a.epochs),
                                 student_temp=0.1, center_momentum=0.9, epoch_steps=epoch))
    else:
        c.loss = ConfigDict(dict(name="simdino", eps_sq=a.eps_sq, gamma=None, coeff=1.0, expa_type=1,
                                 logdet_dtype="float32"))
    c.teacher = ConfigDict(dict(momentum=0.996, momentum_end=1.0))
    c.data = ConfigDict(dict(source=a.source, name=a.name, data_dir=a.data_dir or None, train_split="train",
                             eval_split="validation" if a.source == "tfds" else "test", augment="inception_crop",
                             resize_small=None, flip=False))
    c.mesh.update(data=-1, fsdp=a.fsdp or PLANNED.get(a.variant, 1), tensor=a.tensor)
    c.batch_size = a.batch
    c.eval_batch_size = a.batch
    c.num_epochs = a.epochs
    if a.steps:
        c.total_steps = a.steps
    # 10 warm-up epochs of ImageNet (1,281,167 images); with steps=N, a tenth of the run
    warmup = max(1, a.steps // 10) if a.steps else 10 * max(1, 1_281_167 // a.batch)
    c.optim = ConfigDict(dict(name="adamw", lr=a.lr * a.batch / 256, min_lr=1e-6, warmup_steps=warmup,
                              b1=0.9, b2=0.999, mu_dtype=None, wd=0.04, wd_end=0.4,
                              wd_mask=r"(?!.*/(bias|scale)$).*", clip=3.0, clip_mode="per_param",
                              clip_fuse="qkv", freeze=[], dino_schedule=True,
                              freeze_steps=[(r"head/last_layer/.*", epoch)] if a.loss == "dino" else []))
    c.init = ConfigDict(dict(checkpoint=None, dont_load=None, posemb_resample="2d"))
    probe = dict(params="teacher", image_size=a.global_size,
                 data=dict(augment="inception_crop" if a.source == "tfds" else "none"))
    c.evals.knn = dict(type="knn", k=20, temperature=0.07, every=0, **probe)
    c.evals.linear = dict(type="linear_probe", every=0, **probe,
                          **({"train_split": "train[:10%]"} if a.source == "tfds" else {}))
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
