"""White-box language models in miniature, offline: CRATE-GPT, the CRATE-α LM and GPT-2 at the same width
on real English text that ships with Python, held-out loss side by side, and a generated sample.

    python -m crate_jax.demos.lm --workdir runs/lm_demo [--steps 400] [--width 96] [--depth 3]

1. The corpus is the standard library's `pydoc_data/topics.py` (the text of `help('TOPIC')`, ~465k
   characters of English prose with some code). Each topic is cut at paragraph breaks into documents of
   about 2,000 characters; `crate_jax.data.tokens.prepare` holds out 10 % of the documents (seeded hash)
   and trains a byte-level BPE of 1,024 entries on the **train** documents only.
2. The three models train with `configs/lm.py` (the nanoGPT recipe: AdamW(0.9, 0.95), wd 0.1, warm-up
   + cosine, clip 1.0), shrunk: width 96, depth 3, 4 heads, block 64, batch 24, 400 steps, lr 2e-3,
   float32, the same for all three.
3. Held-out loss (nats per token) and perplexity over every held-out window, one table; a sample from
   each model (temperature 0.8, top-k 40, with the cache), and a params-only bundle per model (with its
   tokenizer) for `crate_jax.generate`, `crate_jax.predict --tokens` and `crate_jax.analyze --tokens`.

Re-running on the same workdir reuses the data and resumes or re-evaluates finished runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MODELS = ("crate_gpt", "crate_alpha", "gpt2")
NAMES = {"crate_gpt": "CRATE-GPT", "crate_alpha": "CRATE-α LM", "gpt2": "GPT-2"}


def corpus_documents(chunk_chars: int = 2000) -> list[str]:
    """`pydoc_data.topics` cut into documents of about `chunk_chars` characters at paragraph breaks."""
    from pydoc_data.topics import topics
    docs = []
    for name in sorted(topics):
        current = ""
        for para in topics[name].split("\n\n"):
            if current and len(current) + len(para) > chunk_chars:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current.strip():
            docs.append(current)
    return docs


def prepare_data(workdir: Path, vocab: int) -> Path:
    from crate_jax.data.tokens.prepare import MANIFEST, prepare
    data = workdir / "data"
    if (data / MANIFEST).is_file():
        return data
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "topics.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in corpus_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    prepare([str(corpus)], data, train_tokenizer=vocab, val_fraction=0.1, seed=0)
    return data


def config_args(model: str, data: Path, a) -> str:
    return (f"model={model},data={data},block={a.block},batch={a.batch},steps={a.steps},width={a.width},"
            f"depth={a.depth},heads={a.heads},dtype=float32,lr={a.lr},min_lr={a.lr / 10},warmup={a.steps // 10},"
            f"eval_windows=0,eval_every={a.steps},eval_batch=32,log_every={max(1, a.steps // 10)},"
            f"ckpt_every={a.steps},seed=0")


def run_model(model: str, data: Path, workdir: Path, a) -> dict:
    from crate_jax.configs import lm
    from crate_jax.train.loop import train_and_evaluate
    arg = config_args(model, data, a)
    config = lm.get_config(arg)
    config.keep_checkpoints = 1
    print(f"\n== {NAMES[model]}: configs/lm.py:{arg}", flush=True)
    t0 = time.perf_counter()
    out = train_and_evaluate(config, workdir / model)
    return {"train_s": time.perf_counter() - t0, "loss": out["eval/val/loss"],
            "perplexity": out["eval/val/perplexity"], "tokens": out["eval/val/tokens"], "config": arg}


def export(model: str, workdir: Path) -> Path:
    """A params-only bundle of the run, with its tokenizer, preprocessing and card."""
    from crate_jax.checkpoint import models
    from crate_jax.checkpoint.outputs import check_output
    check_output(workdir / "bundles" / model, workdirs=(workdir / model,))
    return models.bundle_from(workdir / model, workdir / "bundles" / model, overwrite=True,
                              label=f"crate_jax.demos.lm:{model}")[2]


def main(argv=None) -> int:
    from crate_jax.cli import tool_parser
    ap = tool_parser("crate_jax.demos.lm", __doc__)
    ap.add_argument("--workdir", default="runs/lm_demo", help="where runs, bundles and the table go")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated models to train")
    ap.add_argument("--steps", type=int, default=400, help="training steps per model")
    ap.add_argument("--width", type=int, default=96, help="model width")
    ap.add_argument("--depth", type=int, default=3, help="layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--block", type=int, default=64, help="context length in tokens")
    ap.add_argument("--batch", type=int, default=24, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (trained offline)")
    ap.add_argument("--prompt", default="The with statement", help="prompt of the generated sample")
    ap.add_argument("--sample-tokens", type=int, default=60, help="tokens generated per sample")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        print(f"error: unknown models {unknown}; choose from {MODELS}", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    workdir = Path(a.workdir)
    data = prepare_data(workdir, a.vocab)
    results = {m: run_model(m, data, workdir, a) for m in models}

    from crate_jax.data.tokens.loader import TokenDataset
    from crate_jax.checkpoint.models import load
    from crate_jax.models import count_params
    from crate_jax.models import lm_decode
    from crate_jax.text.bpe import BPETokenizer
    tok = BPETokenizer.load(TokenDataset(data).tokenizer_path)
    prompt = tok.encode(a.prompt)
    samples = {}
    for m in models:
        bundle = export(m, workdir)
        _, model = load(bundle, kind="lm")
        results[m]["params"] = count_params(model)
        out = lm_decode.generate(model, [prompt], a.sample_tokens, temperature=0.8, top_k=40, seed=0)
        samples[m] = tok.decode(out[0].tolist())
        results[m]["bundle"] = str(bundle)
    wall = time.perf_counter() - t_all

    ds = TokenDataset(data)
    split = ds.manifest["splits"]
    print(f"\n== held-out loss on pydoc_data/topics.py ({split['train']['tokens']:,} train / "
          f"{split['val']['tokens']:,} held-out tokens, BPE {ds.vocab_size}; width {a.width}, depth {a.depth}, "
          f"{a.heads} heads, block {a.block}, {a.steps} steps of {a.batch}×{a.block} tokens; run s: this invocation's "
          f"training + evaluation, a re-run only re-evaluates)")
    print(f"{'model':<12} {'params':>10} {'held-out loss':>14} {'perplexity':>11} {'run s':>8}")
    for m in models:
        r = results[m]
        print(f"{NAMES[m]:<12} {r['params']:>10,} {r['loss']:>14.4f} {r['perplexity']:>11.2f} {r['train_s']:>8.0f}")
    for m in models:
        print(f"\n-- {NAMES[m]} ({a.sample_tokens} tokens after {a.prompt!r}, temperature 0.8, top-k 40, "
              f"with the cache):\n{samples[m]}")
    print(f"\nwall time {wall:.0f} s")
    (workdir / "results.json").write_text(json.dumps({"results": results, "samples": samples, "wall_s": wall,
                                                      "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    from crate_jax import errors
    errors.exit_with(main)
