"""Top-k tables of a model's outputs: for each input, the k likeliest classes (or next tokens) with their
names and softmax probabilities, written as JSON or CSV by the file's extension.

JSON: `{"top_k": k, "predictions": [{"input": NAME, "top_k": [{"rank", "index", "label", "probability",
"logit"}, ...], "logits": [...]}, ...]}` (the full logits of each input included). CSV: one row per input and
rank, columns `input,rank,index,label,probability,logit`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

TABLE_SUFFIXES = (".json", ".csv")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels: list[str] | None, k: int) -> list[list[dict]]:
    """Per row of `logits [N, C]`: the `k` largest, best first (ties: the lower index)."""
    probs = softmax(logits)
    k = max(1, min(int(k), logits.shape[-1]))
    order = np.argsort(-np.asarray(logits, np.float64), axis=-1, kind="stable")[:, :k]
    return [[{"rank": r + 1, "index": int(i), "label": labels[i] if labels and i < len(labels) else str(int(i)),
              "probability": float(probs[n, i]), "logit": float(logits[n, i])} for r, i in enumerate(row)]
            for n, row in enumerate(order)]


def render(path, inputs: list[str], logits: np.ndarray, labels: list[str] | None, k: int) -> bytes:
    """The bytes of the top-k table for `path`'s extension (`.json` or `.csv`)."""
    rows = top_k(logits, labels, k)
    if Path(path).suffix.lower() == ".json":
        preds = [{"input": name, "top_k": r, "logits": [float(v) for v in np.asarray(lg).ravel()]}
                 for name, r, lg in zip(inputs, rows, logits)]
        return (json.dumps({"top_k": len(rows[0]) if rows else 0, "predictions": preds}, indent=1,
                           ensure_ascii=False) + "\n").encode("utf-8")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "rank", "index", "label", "probability", "logit"])
    for name, r in zip(inputs, rows):
        for e in r:
            w.writerow([name, e["rank"], e["index"], e["label"], f"{e['probability']:.6g}", f"{e['logit']:.6g}"])
    return buf.getvalue().encode("utf-8")
