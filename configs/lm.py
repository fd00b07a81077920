"""White-box language models on OpenWebText: CRATE-GPT, the CRATE-α LM, and the GPT-2 baseline
(docs/math.md §Language models).

The defaults are the nanoGPT OpenWebText recipe, the one CRATE pull request #13 trains CRATE-GPT with
(it has no training script of its own). Sources, each number:

* AdamW β = (0.9, 0.95), weight decay 0.1 on every ≥ 2-D parameter (embeddings, kernels, the ISTA /
  ODL dictionaries; not biases and LayerNorms), peak lr 6e-4, 2,000 linear warm-up steps, cosine to
  min_lr 6e-5 over 600,000 steps, gradient clipping at 1.0: nanoGPT `train.py` defaults
  (`learning_rate`, `beta1`, `beta2`, `weight_decay`, `warmup_iters`, `lr_decay_iters`, `min_lr`,
  `grad_clip`) and `config/train_gpt2.py` (`max_iters = lr_decay_iters = 600000`, `weight_decay = 1e-1`).
  nanoGPT's own parameter groups are the same split (`p.dim() >= 2` decays); its AdamW is torch's,
  so the decay is lr-scaled, as here (`crate_jax.train.optim`).
* About 0.5M tokens a step: `config/train_gpt2.py`, "12 batch size * 1024 block size * 5 gradaccum *
  8 GPUs = 491,520" -> global batch 480 sequences of block 1024 here (`batch=480`).
* Vocab 50257 (GPT-2's BPE), padded to a multiple of 64 = 50304 rows (nanoGPT's `vocab_size = 50304`,
  "padded up to nearest multiple of 64 for efficiency"; the padded rows are masked out of the
  logits here, so the model is exactly the 50257-token one), block 1024, dropout 0.0, bf16 compute
  (nanoGPT: `dtype = 'bfloat16'` autocast over float32 parameters).
* Held-out data: nanoGPT `data/openwebtext/prepare.py` holds out 0.05 % of documents (seed 2357) and
  evaluates every `eval_interval = 1000` steps on `eval_iters = 200` batches of 12 sequences (2,400
  windows): `evals.val` does the same number of windows, in order rather than at random.

Models (`model=`), with `variant=` from `crate_jax.models.lm.LM_VARIANTS`:
  crate_gpt (default `crate`, 12L/12H/768: 60,663,552 parameters; `crate-medium`, `crate-large`, `crate-xl`),
  crate_alpha (`S` 69,379,776; `B` 110,201,088; `L` 304,270,336), gpt2 (`gpt2` = small, 124,439,808; ...).
  `width=`, `depth=`, `heads=` override the size (the demo and tests shrink it).

Commands (data first, once; the GPT-2 tokenizer is its `vocab.json` + `merges.txt`, from disk):

    python -m crate_jax.data.tokens.prepare --input 'openwebtext/plain_text/*.parquet' --tokenizer gpt2/ \\
        --output $DATA/owt
    # one GPU node (8 × A100/H100), nanoGPT's batch split: 5 microbatches of 96 = 12 sequences per GPU
    python -m crate_jax.train --config configs/lm.py:model=crate_gpt,data=$DATA/owt,micro=5 --workdir runs/crate_gpt
    python -m crate_jax.train --config configs/lm.py:model=gpt2,data=$DATA/owt,micro=5 --workdir runs/gpt2
    python -m crate_jax.train --config configs/lm.py:model=crate_alpha,variant=B,data=$DATA/owt,micro=5 \\
        --workdir runs/crate_alpha_b
    # a TPU slice (launch/README.md), data and workdir on GCS
    python launch/tpu_vm.py run $NAME --accelerator-type v5p-32 \\
      --config "configs/lm.py:model=crate_gpt,data=$BUCKET/owt" --workdir $BUCKET/runs/crate_gpt

Arguments: model, variant, block, data, vocab (0: the data manifest's; 50257 without data), vocab_multiple,
steps, batch, micro, lr, min_lr, warmup, wd, width / depth / heads (0: the variant's), dtype, scan, remat,
dropout, eval_every, eval_windows (0: all), eval_batch, log_every, ckpt_every, seed, mesh (data | fsdp |
tensor:N for `fsdp=-1, tensor=N` | axes joined by `+`, each AXIS for the rest of the devices or AXIS:N, e.g.
data+tensor:4 for `data=-1, tensor=4`, data+fsdp:8+tensor:2).

On a v5p-128 (64 chips) the 480 sequences do not divide over 64 data-parallel chips. `python -m crate_jax.aot
--plan` ranks four layouts with tensor parallelism and remat dots first there, tied at 18.4 ms a step at the
roofline, compute-bound (data 32 x tensor 2, data 16 x tensor 4, and either in FSDP groups of 8; the residual
stream is split along its tokens over tensor, docs/scale.md; bench/RESULTS.md "A plan per recipe"):
`configs/lm.py:model=crate_alpha,variant=B,mesh=data+tensor:2,remat=dots`. The defaults stay the 8-GPU node's
(data parallel, no remat).
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args


def _mesh(spec: str) -> dict:
    """`data`, `fsdp`, `tensor:N` (fsdp -1, tensor N), or axes joined by `+`, each `AXIS` (-1: the rest of the
    devices) or `AXIS:N`, the others 1: `data+tensor:4`, `data+fsdp:8+tensor:2`."""
    parts = spec.split("+")
    if len(parts) == 1 and spec.startswith("tensor:"):
        parts = ["fsdp", spec]
    sizes = dict(data=1, fsdp=1, tensor=1)
    for part in parts:
        name, _, n = part.partition(":")
        if name not in sizes or (n and not n.isdigit()) or (n and int(n) < 1):
            raise ValueError(f"mesh={spec!r}: expected data, fsdp, tensor:N, or axes joined by '+' "
                             f"(each AXIS or AXIS:N, e.g. data+fsdp:8+tensor:2)")
        sizes[name] = int(n) if n else -1
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh={spec!r}: at most one axis without a size (it takes the rest of the devices)")
    return sizes


def get_config(arg: str = ""):
    a = parse_args(arg, model="crate_gpt", variant="", block=1024, data="", vocab=0, vocab_multiple=64,
                   steps=600_000, batch=480, micro=1, lr=6e-4, min_lr=6e-5, warmup=2_000, wd=0.1, width=0, depth=0,
                   heads=0, dtype="bfloat16", scan=True, remat="none", dropout=0.0, eval_every=1_000,
                   eval_windows=2_400, eval_batch=0, log_every=10, ckpt_every=1_000, seed=1337, mesh="data")
    c = base_config()
    c.task = "lm"
    c.seed = a.seed  # nanoGPT seeds torch with 1337
    c.block = a.block
    del c.loss  # next-token cross-entropy has no options
    model = dict(name=a.model, variant=a.variant, vocab_multiple=a.vocab_multiple, dtype=a.dtype, scan=a.scan,
                 remat=a.remat, dropout=a.dropout)
    model.update({k: v for k, v in dict(vocab_size=a.vocab, width=a.width, depth=a.depth, num_heads=a.heads).items()
                  if v})
    c.model = ConfigDict(model)
    c.data = ConfigDict(dict(dir=a.data, num_threads=2))
    c.batch_size = a.batch
    c.microbatches = a.micro
    c.total_steps = a.steps
    c.mesh = ConfigDict(_mesh(a.mesh))
    c.optim.update(name="adamw", lr=a.lr, min_lr=a.min_lr, warmup_steps=a.warmup, b1=0.9, b2=0.95, eps=1e-8,
                   wd=a.wd, wd_mask=r".*(kernel|embedding|/D|/D1)", clip=1.0)
    c.init = ConfigDict(dict(checkpoint=None, dont_load=None, posemb_resample=None))
    c.evals = ConfigDict()
    c.evals.val = dict(type="lm_loss", split="val", max_windows=a.eval_windows or None)
    c.eval_every = a.eval_every
    c.eval_batch_size = a.eval_batch or min(a.batch, 96)
    c.log_every = a.log_every
    c.checkpoint_every = a.ckpt_every
    c.keep_checkpoints = 3
    return c
