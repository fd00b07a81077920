"""Masked-language-model pretraining: CRATE-BERT (the CRATE journal paper's white-box BERT) and the BERT baseline
(`crate_jax.models.bert`, task `mlm`: `crate_jax.mlm.task`).

The defaults are RoBERTa's large-batch recipe, which the CRATE-BERT comparison follows. Sources, each number:

* 8,192 sequences of 512 tokens a step, peak lr 1e-3, about 30k steps: RoBERTa (Liu et al. 2019) Table 3, the
  "bsz 8K, steps 31K, lr 1e-3" row (30,000 here, as the CRATE-BERT issue states the recipe).
* 1,800 linear warm-up steps (6 % of the run), then linear decay to 0: the warm-up length is the figure the
  CRATE-BERT issue gives (not confirmed from the paper here); linear warm-up and decay are RoBERTa's (Appendix C,
  Table 9: "Learning Rate Decay: Linear").
* Adam β = (0.9, 0.98), ε = 1e-6, weight decay 0.01, no gradient clipping, dropout 0.1: RoBERTa Table 9
  (decoupled AdamW here; decay on kernels, embeddings and the ISTA dictionaries, not biases / LayerNorms).
* Dynamic masking 15 % with 80 / 10 / 10 (mask / random / keep): BERT §3.1 and RoBERTa §4.1; FULL-SENTENCES
  packing with `<s>` / `</s>` (RoBERTa §4.2): `crate_jax.mlm.data`.
* bf16 compute over float32 parameters (RoBERTa trains in mixed precision, fp16).
* Sizes: `base` 12 layers / 12 heads / width 768 (CRATE-BERT: 60,914,265 parameters with the MLM head on the
  RoBERTa BPE; BERT 124,698,201 at the same vocabulary), `large` 24 / 16 / 1024.

Commands (data first, once, with RoBERTa's `vocab.json` + `merges.txt` from disk, or `--train-tokenizer N`):

    python -m crate_jax.data.tokens.prepare --input 'corpus/*.jsonl' --tokenizer roberta-base/ --output $DATA/mlm
    # one GPU node (8 × H100): 8,192 rows as 8 microbatches of 1,024
    python -m crate_jax.train --config configs/mlm.py:model=crate_bert,data=$DATA/mlm,micro=8 --workdir runs/crate_bert
    python -m crate_jax.train --config configs/mlm.py:model=bert,data=$DATA/mlm,micro=8 --workdir runs/bert
    # a TPU slice (launch/README.md), data and workdir on GCS
    python launch/tpu_vm.py run $NAME --accelerator-type v5p-64 \\
      --config "configs/mlm.py:model=crate_bert,data=$BUCKET/mlm" --workdir $BUCKET/runs/crate_bert

Arguments: model (crate_bert | bert), variant (base | large), seq_len, data, vocab (0: the data's), steps, batch,
micro, lr, warmup, wd, width / depth / heads (0: the variant's), dtype, scan, remat, dropout, eval_every,
eval_rows (0: all), eval_batch, log_every, ckpt_every, seed, mesh (data | fsdp | tensor:N).
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args


def get_config(arg: str = ""):
    a = parse_args(arg, model="crate_bert", variant="base", seq_len=512, data="", vocab=0, steps=30_000, batch=8192,
                   micro=1, lr=1e-3, warmup=1_800, wd=0.01, width=0, depth=0, heads=0, dtype="bfloat16", scan=True,
                   remat="none", dropout=0.1, eval_every=1_000, eval_rows=2_048, eval_batch=0, log_every=10,
                   ckpt_every=1_000, seed=0, mesh="data")
    c = base_config()
    c.task = "mlm"
    c.seed = a.seed
    c.seq_len = a.seq_len
    del c.loss  # the masked-token cross-entropy has no options
    model = dict(name=a.model, variant=a.variant, dtype=a.dtype, scan=a.scan, remat=a.remat, dropout=a.dropout)
    model.update({k: v for k, v in dict(vocab_size=a.vocab, width=a.width, depth=a.depth, num_heads=a.heads).items()
                  if v})
    c.model = ConfigDict(model)
    c.data = ConfigDict(dict(dir=a.data, num_threads=2))
    c.masking = ConfigDict(dict(prob=0.15, mask_frac=0.8, random_frac=0.1))
    c.batch_size = a.batch
    c.microbatches = a.micro
    c.total_steps = a.steps
    if a.mesh == "data":
        c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    elif a.mesh == "fsdp":
        c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    elif a.mesh.startswith("tensor:"):
        c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=int(a.mesh.split(":", 1)[1])))
    else:
        raise ValueError(f"mesh={a.mesh!r}: expected data, fsdp or tensor:N")
    c.optim.update(name="adamw", lr=a.lr, min_lr=0.0, warmup_steps=a.warmup, schedule="linear", b1=0.9, b2=0.98,
                   eps=1e-6, wd=a.wd, wd_mask=r".*(kernel|embedding|position|token_type|/D)", clip=0.0)
    c.init = ConfigDict(dict(checkpoint=None, dont_load=None, posemb_resample=None))
    c.evals = ConfigDict()
    c.evals.val = dict(type="mlm_loss", split="val", max_rows=a.eval_rows or None)
    c.eval_every = a.eval_every
    c.eval_batch_size = a.eval_batch or min(a.batch, 256)
    c.log_every = a.log_every
    c.checkpoint_every = a.ckpt_every
    c.keep_checkpoints = 3
    return c
