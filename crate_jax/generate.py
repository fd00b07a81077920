"""Sample text from a language-model bundle or training workdir, jitted with a cache.

    python -m crate_jax.generate --checkpoint DIR --prompt TEXT [--max-new-tokens 100] [--temperature 0.8]
        [--top-k 200] [--seed 0] [--num-samples 1] [--tokenizer PATH] [--step N] [--compare-no-cache]

The prompt is tokenised with the checkpoint's tokenizer (`--tokenizer`, else `DIR/tokenizer.json`, else
the training data directory's), then one jitted program runs the prefill and a `fori_loop` of cached
single-token steps (`crate_jax.models.lm_decode`). `--temperature 0` is greedy decoding;
`--top-k K` samples among the K likeliest tokens (nanoGPT `sample.py` defaults: 0.8 and 200).

The cache: MSSA shares q = k = v, so CRATE-GPT and the CRATE-α LM keep one tensor per layer,
GPT-2 two (k and v); the line `cache:` reports its size and that of the other kind at the same size.
`--compare-no-cache` also decodes greedily without the cache (the whole prefix recomputed every step)
and reports whether the tokens agree and both speeds.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from crate_jax import errors
from crate_jax.checkpoint.bundle import BundleError
from crate_jax.checkpoint.models import load
from crate_jax.cli import tool_parser
from crate_jax.lm.inference import TokenInputError, find_tokenizer
from crate_jax.models import ConfigError
from crate_jax.models import lm_decode
from crate_jax.text.bpe import BPETokenizer, TokenizerError


def parse_args(argv=None) -> argparse.Namespace:
    ap = tool_parser("crate_jax.generate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="language-model bundle or training workdir")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (>= 1)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=200, help="0: no top-k restriction")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or vocab.json + merges.txt directory")
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: the newest)")
    ap.add_argument("--compare-no-cache", action="store_true",
                    help="also decode greedily without the cache and compare tokens and speed")
    return ap.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Every numeric option finite and in range, before a model is loaded (`TokenInputError`, exit 2)."""
    import math
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise TokenInputError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        raise TokenInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise TokenInputError(f"--top-k must be >= 0 (0: no restriction), got {args.top_k}")
    if args.num_samples < 1:
        raise TokenInputError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not 0 <= args.seed < 2 ** 32:
        raise TokenInputError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.step is not None and args.step < 0:
        raise TokenInputError(f"--step must be >= 0, got {args.step}")


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
        cfg, model = load(args.checkpoint, args.step, kind="lm")
        tok = BPETokenizer.load(find_tokenizer(args.checkpoint, args.tokenizer))
        if tok.vocab_size > cfg.vocab_size:
            raise TokenInputError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; "
                                  f"pass the tokenizer the model was trained with (--tokenizer)")
        ids = tok.encode(args.prompt)
        prompt = np.tile(np.asarray(ids, np.int32)[None], (args.num_samples, 1))
        lm_decode.check_lengths(cfg, prompt.shape[1], args.max_new_tokens)
        t0 = time.perf_counter()
        out = lm_decode.generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, seed=args.seed)
        dt = time.perf_counter() - t0
    except (BundleError, ConfigError, TokenInputError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(out):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode(row.tolist()))
    B, L = prompt.shape[0], prompt.shape[1] + args.max_new_tokens
    ours = lm_decode.cache_bytes(cfg, B, L)
    mssa = cfg.model != "gpt2"
    other = ours * 2 if mssa else ours // 2
    print(f"\n{cfg.model} {cfg.variant}: {args.max_new_tokens} new tokens in {dt:.2f} s (with compilation); cache: "
          f"{'one tensor (w: q = k = v)' if mssa else 'two tensors (k, v)'} per layer, [{cfg.depth}, {B}, {L}, "
          f"{cfg.num_heads}, {cfg.head_dim}] {cfg.dtype} = {_mib(ours)}; "
          f"{'a GPT-2 (k, v)' if mssa else 'an MSSA (w)'} cache of the same size would take {_mib(other)}",
          file=sys.stderr)
    if args.compare_no_cache:
        t1 = time.perf_counter()
        cached = lm_decode.generate(model, prompt[:1], args.max_new_tokens, temperature=0.0)
        t_cache = time.perf_counter() - t1
        t1 = time.perf_counter()
        plain, _ = lm_decode.decode_no_cache(model, prompt[:1], args.max_new_tokens)
        t_plain = time.perf_counter() - t1
        same = bool(np.array_equal(cached, plain))
        print(f"greedy with cache == without: {same} ({t_cache:.2f} s with cache, {t_plain:.2f} s without, "
              f"compilation included)", file=sys.stderr)
        if not same:
            return 3
    return 0


if __name__ == "__main__":
    errors.exit_with(main)
