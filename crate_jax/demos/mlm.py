"""CRATE-BERT vs BERT in miniature, offline: masked-LM pretraining on the English text that ships with Python, then
fine-tuning both on a small classification task built from the same text, over several seeds.

    python -m crate_jax.demos.mlm --workdir runs/mlm_demo [--seeds 0,1,2] [--steps 300] [--width 96] [--depth 3]

About 20 minutes on two CPU cores.

1. Corpus and tokens: the standard library's `pydoc_data/topics.py`, cut into ~2,000-character documents, 10 % held
   out, a byte-level BPE of 1,024 entries trained on the train documents (`crate_jax.demos.lm`, the LM demo's data).
2. Pretraining: `configs/mlm.py` shrunk (width 96, depth 3, 4 heads, rows of 64 tokens, batch 32, 300 steps, lr
   2e-3, 15 % dynamic masking, float32, dropout 0), CRATE-BERT and BERT with the same embeddings and MLM head.
   Held-out masked-token loss and accuracy over every held-out row (fixed masks).
3. Fine-tuning task ("word order"): sentences of 6-30 words from the same documents; label 1 for the sentence
   as written, 0 for its words in a random order (each sentence appears once, as one or the other). Train /
   validation sentences come from the train / held-out documents of step 1, so the encoder never saw a
   validation sentence. `configs/glue.py` with `source=jsonl`: 200 steps of batch 32, lr 1e-3 (linear warm-up
   and decay), from each pretrained run.
4. One table, mean ± standard deviation over the seeds (each seed: its own init, masks and data order).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np

MODELS = ("crate_bert", "bert")
NAMES = {"crate_bert": "CRATE-BERT", "bert": "BERT"}


def word_order_task(workdir: Path, seed: int = 0) -> Path:
    """`train.jsonl` / `validation.jsonl` of `{sentence, label}` (module docstring, step 3)."""
    from crate_jax.data.tokens.prepare import split_of
    from crate_jax.demos.lm import corpus_documents
    out = workdir / "word_order"
    if (out / "validation.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = {"train": [], "val": []}
    for i, doc in enumerate(corpus_documents()):  # the same documents and split as the pretraining data
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sent.split()
            if not 6 <= len(words) <= 30 or not re.fullmatch(r"[A-Za-z][^\n]*", sent):
                continue
            label = rng.random() < 0.5
            if not label:
                shuffled = words[:]
                while shuffled == words:
                    rng.shuffle(shuffled)
                words = shuffled
            rows[split_of(i, 0, 0.1)].append({"sentence": " ".join(words), "label": int(label)})
    for name, split in (("train", "train"), ("validation", "val")):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[split])
    return out


def pretrain(model: str, seed: int, data: Path, workdir: Path, a) -> dict:
    from crate_jax.configs import mlm
    from crate_jax.train.loop import train_and_evaluate
    arg = (f"model={model},data={data},seq_len={a.seq_len},batch={a.batch},steps={a.steps},width={a.width},"
           f"depth={a.depth},heads={a.heads},dtype=float32,dropout=0.0,lr={a.lr},warmup={a.steps // 10},eval_rows=0,"
           f"eval_every={a.steps},eval_batch=32,log_every={max(1, a.steps // 5)},ckpt_every={a.steps},seed={seed}")
    config = mlm.get_config(arg)
    config.keep_checkpoints = 1
    print(f"\n== {NAMES[model]} seed {seed}: configs/mlm.py:{arg}", flush=True)
    out = train_and_evaluate(config, workdir)
    return {"loss": out["eval/val/loss"], "accuracy": out["eval/val/accuracy"], "tokens": out["eval/val/tokens"]}


def finetune(init: Path, seed: int, data: Path, task: Path, workdir: Path, a) -> dict:
    from crate_jax.configs import glue
    from crate_jax.train.loop import train_and_evaluate
    arg = (f"task=sst2,source=jsonl,data={task},init={init},vocab={data},seq_len={a.seq_len},batch=32,"
           f"steps={a.ft_steps},lr={a.ft_lr},dropout=0.0,log_every={max(1, a.ft_steps // 5)},ckpt_every={a.ft_steps},"
           f"seed={seed}")
    config = glue.get_config(arg)
    print(f"-- fine-tune: configs/glue.py:{arg}", flush=True)
    return {"accuracy": train_and_evaluate(config, workdir)["eval/val/accuracy"]}


def main(argv=None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.demos.mlm", __doc__)
    ap.add_argument("--workdir", default="runs/mlm_demo", help="where runs, bundles and the table go")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=300, help="masked-LM pre-training steps")
    ap.add_argument("--ft-steps", type=int, default=200, help="word-order fine-tuning steps")
    ap.add_argument("--width", type=int, default=96, help="model width")
    ap.add_argument("--depth", type=int, default=3, help="layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    ap.add_argument("--batch", type=int, default=32, help="rows per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="pre-training peak learning rate")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning learning rate")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (trained offline)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    t0 = time.perf_counter()
    from crate_jax.demos.lm import prepare_data
    workdir = Path(a.workdir)
    data = prepare_data(workdir, a.vocab)
    task = word_order_task(workdir)
    res: dict[str, list[dict]] = {m: [] for m in MODELS}
    for seed in seeds:
        for m in MODELS:
            run = workdir / f"{m}_s{seed}"
            r = pretrain(m, seed, data, run, a)
            r["finetune"] = finetune(run, seed, data, task, workdir / f"{m}_s{seed}_word_order", a)["accuracy"]
            res[m].append(r)
    wall = time.perf_counter() - t0
    counts = {s: sum(1 for _ in open(task / f"{s}.jsonl")) for s in ("train", "validation")}
    print(f"\n== CRATE-BERT vs BERT on pydoc_data/topics.py (width {a.width}, depth {a.depth}, {a.heads} heads, rows of "
          f"{a.seq_len} tokens, {a.steps} MLM steps of {a.batch}; word-order fine-tuning {a.ft_steps} steps on "
          f"{counts['train']:,} sentences, {counts['validation']:,} held out); mean ± std over seeds {seeds}")
    print(f"{'model':<11} {'held-out MLM loss':>18} {'MLM accuracy':>14} {'word-order accuracy':>20}")
    for m in MODELS:
        col = lambda k: np.array([r[k] for r in res[m]])
        fmt = lambda x, p: f"{x.mean():.{p}f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.{p}f}"
        print(f"{NAMES[m]:<11} {fmt(col('loss'), 3):>18} {fmt(col('accuracy'), 3):>14} {fmt(col('finetune'), 3):>20}")
    print(f"\nwall time {wall:.0f} s")
    (workdir / "results.json").write_text(json.dumps({"results": res, "seeds": seeds, "args": vars(a), "wall_s": wall},
                                                     indent=2))
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
