"""GLUE fine-tuning of a CRATE-BERT or BERT encoder (task `glue`: `crate_jax.mlm.glue`), from any bundle or run of
kind 'bert' (`init=`: an `mlm` run of configs/mlm.py, or a converted crate-bert-hf / bert-hf / roberta-hf bundle).

    python -m crate_jax.train --config configs/glue.py:task=sst2,init=runs/crate_bert,vocab=$DATA/mlm \\
        --workdir runs/crate_bert_sst2
    python -m crate_jax.train --config configs/glue.py:task=mnli,init=runs/bert,vocab=$DATA/mlm,data=$TFDS \\
        --workdir runs/bert_mnli

Defaults, with their sources: batch 32, peak lr 2e-5, 10 epochs, linear warm-up over the first 6 % of the steps
then linear decay, Adam β = (0.9, 0.98), ε = 1e-6, weight decay 0.1, dropout 0.1, rows of at most 128 tokens:
RoBERTa's GLUE recipe (Liu et al. 2019, Appendix C, Table 10: lr ∈ {1e-5, 2e-5, 3e-5}, batch ∈ {16, 32},
wd 0.1, 10 epochs, warm-up ratio 0.06; 128 tokens as BERT's GLUE runs). The metric each task reports:
`crate_jax.mlm.glue_metrics`. Data: TFDS `glue/<task>` under `data=` (prepared with `tfds build`), or
`source=jsonl` with `<data>/{train,validation}.jsonl` (the offline demo's task).

Arguments: task (cola | sst2 | mrpc | qqp | stsb | mnli | qnli | rte | wnli), init, vocab (the text_prepare
directory of the pretraining data: its tokenizer), data, source (tfds | jsonl), seq_len, batch, epochs, lr,
warmup_frac, wd, dropout, dtype, eval_batch, log_every, ckpt_every, seed, model / variant / width / depth / heads
(a fresh encoder when no init is given).
"""

from ml_collections import ConfigDict

from crate_jax.configs.common import base_config, parse_args


def get_config(arg: str = ""):
    a = parse_args(arg, task="sst2", init="", vocab="", data="", source="tfds", seq_len=128, batch=32, epochs=10.0,
                   lr=2e-5, warmup_frac=0.06, wd=0.1, dropout=0.1, dtype="float32", eval_batch=0, log_every=50,
                   ckpt_every=1_000, seed=0, model="crate_bert", variant="base", width=0, depth=0, heads=0,
                   steps=0)
    c = base_config()
    c.task = "glue"
    c.glue_task = a.task
    c.seed = a.seed
    c.seq_len = a.seq_len
    del c.loss
    model = dict(dtype=a.dtype, dropout=a.dropout)
    if not a.init:
        model.update(name=a.model, variant=a.variant)
        model.update({k: v for k, v in dict(width=a.width, depth=a.depth, num_heads=a.heads).items() if v})
    c.model = ConfigDict(model)
    c.data = ConfigDict(dict(source=a.source, dir=a.data, vocab_dir=a.vocab))
    c.batch_size = a.batch
    if a.steps:
        c.total_steps = a.steps
    else:
        c.num_epochs = a.epochs
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.optim.update(name="adamw", lr=a.lr, min_lr=0.0, warmup_steps=0, warmup_frac=a.warmup_frac, schedule="linear",
                   b1=0.9, b2=0.98, eps=1e-6, wd=a.wd, wd_mask=r".*(kernel|embedding|position|token_type|/D)",
                   clip=0.0)
    c.init = ConfigDict(dict(checkpoint=a.init or None, dont_load=None, posemb_resample=None))
    c.evals = ConfigDict()
    c.evals.val = dict(type="glue")
    c.eval_every = 0
    c.eval_batch_size = a.eval_batch or a.batch
    c.log_every = a.log_every
    c.checkpoint_every = a.ckpt_every
    c.keep_checkpoints = 1
    return c
