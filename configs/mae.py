"""CRATE-MAE masked-autoencoder pre-training on ImageNet-1K (docs/math.md §CRATE-MAE; Pai et al., "Masked Completion via
Structured Diffusion with White-Box Transformers", ICLR 2024, arXiv 2404.02446).

Sources, and what each fixes:

* the official model code, `Ma-Lab-Berkeley/CRATE` `model/crate_ae/*` (docs/math.md §CRATE-MAE): the architecture and
  presets (`mae_crate_{tiny,small,base,large}`: encoder = decoder width / depth / heads, patch 16,
  λ = 0.5), the mask ratio 0.75, the loss on removed patches, `norm_pix_loss`;
* the CRATE repository ships **no** CRATE-MAE training script, and the paper's appendix could not be read
  from this workplace. `crate_ae.py` is a fork of MAE's `models_mae.py` (`MaskedAutoencoderViT`,
  `random_masking`, `forward_loss`, the `mae_vit_*` presets), so the optimisation recipe here is MAE's
  (He et al. 2022, Table 8 and `main_pretrain.py` defaults): AdamW β = (0.9, 0.95), base lr 1.5e-4 per 256
  images (lr = 1.5e-4 × 4096/256 = 2.4e-3), weight decay 0.05 on every weight except biases and norms,
  global batch 4096, 800 epochs, 40 warm-up epochs then cosine to 0, RandomResizedCrop(224, area 20–100 %)
  + flip, `norm_pix_loss=True`. Any CRATE-MAE-specific change to it is **not confirmed**.

Differences: our crop is the package's Inception crop (TF-style box, bilinear) instead of torchvision's
bicubic RandomResizedCrop. MAE's fp16 autocast becomes bfloat16 compute over float32 parameters: `dtype=auto`
(the default) is bfloat16 on the ImageNet source and float32 on the offline ones (`digits`, `mnist`: CPU runs);
the loss is computed in float32.

    python -m crate_jax.train --config configs/mae.py:variant=B/16,data_dir=gs://BUCKET/tfds \\
        --workdir gs://BUCKET/runs/crate_mae_b16
    python launch/tpu_vm.py run crate-mae --zone us-east5-a --project PROJECT --accelerator-type v5p-64 \\
        --config configs/mae.py:variant=B/16,data_dir=gs://BUCKET/tfds --workdir gs://BUCKET/runs/crate_mae_b16

Args: variant (T/S/B/L, patch after '/'), res, batch, epochs, steps (overrides epochs), blr, mask_ratio,
norm_pix (1/0), source (tfds | digits | mnist), name, data_dir, fsdp, tensor, dtype (auto | float32 | bfloat16).
`fsdp` defaults to -1: every device on the fsdp axis (`data=1`), the layout `python -m crate_jax.aot --plan` ranked
first for B/16 on a v5p-128 (bfloat16: 10.7 ms a step at the roofline, compute-bound, against 11.8 for data
parallelism; float32: 18.4 ms, memory-bound; bench/RESULTS.md "A plan per recipe"); fsdp=N > 0 puts N devices on
it and the rest on data.
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import auto_dtype, base_config, parse_args


def get_config(arg: str = ""):
    a = parse_args(arg, variant="B/16", res=224, batch=4096, epochs=800, steps=0, blr=1.5e-4, mask_ratio=0.75,
                   norm_pix=True, source="tfds", name="imagenet2012", data_dir="", fsdp=-1, tensor=1, dtype="auto")
    c = base_config()
    c.task = "mae"
    c.res = a.res
    c.model = ConfigDict(dict(variant=a.variant, mask_ratio=a.mask_ratio, norm_pix_loss=a.norm_pix,
                              dtype=auto_dtype(a.dtype, a.source)))
    c.data = ConfigDict(dict(source=a.source, name=a.name, data_dir=a.data_dir or None, train_split="train",
                             eval_split="validation" if a.source == "tfds" else "test", augment="inception_crop",
                             area_min=20, flip=True, randaug=None))
    del c["loss"]  # the loss is the model's (mask_ratio, norm_pix_loss)
    c.mesh.update(data=1 if a.fsdp == -1 else -1, fsdp=a.fsdp, tensor=a.tensor)
    c.batch_size = a.batch
    c.eval_batch_size = min(a.batch, 1024)
    c.num_epochs = a.epochs
    if a.steps:
        c.total_steps = a.steps
    warmup = max(1, a.steps // 20) if a.steps else 40 * max(1, 1_281_167 // a.batch)
    c.optim = ConfigDict(dict(name="adamw", lr=a.blr * a.batch / 256, min_lr=0.0, warmup_steps=warmup, b1=0.9,
                              b2=0.95, mu_dtype=None, wd=0.05, wd_mask=r"(?!.*/(bias|scale)$).*", clip=0.0, freeze=[]))
    c.init = ConfigDict(dict(checkpoint=None, dont_load=None, posemb_resample="2d"))
    probe = dict(data=dict(augment="inception_crop" if a.source == "tfds" else "none"))
    c.evals.knn = dict(type="knn", every=0, **probe)
    c.evals.linear = dict(type="linear_probe", every=0, **probe,
                          **({"train_split": "train[:10%]"} if a.source == "tfds" else {}))
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
