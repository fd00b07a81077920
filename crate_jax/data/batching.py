"""What every reader does with bad samples and with the end of an eval pass.

* :class:`SkipCounter`: counts skipped samples by kind, logs the first 20 of each kind and then
  every 1000th (each message names the file / key), and, given a limit, stops the run when too many
  images in a row could not be used (a broken data set or the wrong decoder, not a few bad files).
* :func:`pad_rows`: fills the last eval batch up to its fixed size and gives the ``mask`` (True on
  real rows), so that every process runs the same number of fixed-shape steps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# What the image-text readers count: the samples they emitted and each kind of skip.
STAT_KEYS = ("samples", "bad_images", "missing_captions", "missing_images", "missing_labels",
             "bad_shards", "truncated_shards")
LOG_FIRST = 20  # per kind, log the first LOG_FIRST skips, then every LOG_EVERY-th
LOG_EVERY = 1000


class SkipCounter:
    """Counters by kind, thread-safe. ``skip`` counts and logs one skipped sample; ``used`` ends a run
    of skips (and counts the used sample under a kind such as 'samples', without logging).

    Args:
      kinds: the counter names (``snapshot`` returns them in this order).
      max_in_a_row: with a limit, the ``max_in_a_row``-th ``skip`` in a row raises RuntimeError.
      advice: appended to that error, saying what to check or which setting raises the limit.
    """

    def __init__(self, kinds: Sequence[str] = STAT_KEYS, *, max_in_a_row: int | None = None, advice: str = ""):
        self.kinds = tuple(kinds)
        self.max_in_a_row, self.advice = max_in_a_row, advice
        self._counts = {k: 0 for k in self.kinds}
        self._in_a_row = 0
        self._lock = threading.Lock()

    def used(self, kind: str | None = None) -> None:
        """One sample that was used (counted under ``kind`` if given): ends a run of skips."""
        with self._lock:
            if kind is not None:
                self._counts[kind] += 1
            self._in_a_row = 0

    def skip(self, kind: str, message: str) -> None:
        """One skipped sample of ``kind``; ``message`` names the file / key and the reason."""
        with self._lock:
            self._counts[kind] += 1
            n = self._counts[kind]
            self._in_a_row += 1
            in_a_row = self._in_a_row
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            log.warning("skipped (%s #%d): %s", kind, n, message)
        if self.max_in_a_row is not None and in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"{in_a_row} images in a row failed to decode (last: {message}). {self.advice}")

    def __getitem__(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def restore(self, counts: Mapping[str, int]) -> None:
        """Counts from a saved ``snapshot`` (missing kinds are 0); a run of skips starts afresh."""
        with self._lock:
            self._counts = {k: int(counts.get(k, 0)) for k in self.kinds}
            self._in_a_row = 0


def pad_rows(rows: Sequence[Any], batch_size: int, pad: Any) -> tuple[list[Any], np.ndarray]:
    """``rows`` followed by ``pad`` up to ``batch_size`` entries, and ``mask`` bool ``[batch_size]``
    (True on the real rows)."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    return list(rows) + [pad] * (batch_size - len(rows)), np.arange(batch_size) < len(rows)


def stack_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``[{k: array}, ...]`` -> ``{k: stacked array}``, with the keys of the first row."""
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
