"""One process's endless, deterministic stream of raw samples from its webdataset shards.

Shard ``i`` belongs to process ``i % process_count``. Each epoch the process reads its shards in an
order drawn from (seed, process, epoch), ``cycle_length`` of them open at once and read round-robin.
A shard that cannot be opened or is truncated is counted, logged and dropped for that epoch. The
stream's position (epoch, shard-order cursor, the open shards' byte offsets) is a small JSON-able
``state()``; ``restore`` continues from it exactly, mid-shard included.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from crate_jax.data.batching import SkipCounter
from crate_jax.data.seeding import sample_rng
from crate_jax.data.tar_reader import RawSample, ShardError, iter_shard


def process_shards(paths: Sequence[str], process_index: int, process_count: int) -> list[int]:
    """Indices of the shards that ``process_index`` reads: ``i % process_count == process_index``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if len(paths) < process_count:
        raise ValueError(
            f"{len(paths)} shard(s) for {process_count} processes: every process needs at least one "
            "shard (shard i is read by process i % process_count); write more, smaller shards")
    return list(range(process_index, len(paths), process_count))


class ShardStream:
    """One process's endless, deterministic sample stream: per-epoch shard order, round-robin
    interleave of ``cycle_length`` open shards. ``state()`` / ``restore()`` are JSON-able."""

    def __init__(self, paths: Sequence[str], mine: Sequence[int], *, seed: int, process_index: int,
                 cycle_length: int, shuffle: bool, stats: SkipCounter):
        self.paths, self.mine = list(paths), list(mine)
        self.seed, self.process_index = seed, process_index
        self.cycle_length, self.shuffle, self.stats = cycle_length, shuffle, stats
        self._gens: dict[int, tuple[Iterator[RawSample], int]] = {}
        self._begin_epoch(0)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(self.mine)
        perm = sample_rng(self.seed, 0x0DE5, self.process_index, epoch).permutation(len(self.mine))
        return [self.mine[i] for i in perm]

    def _begin_epoch(self, epoch: int) -> None:
        self.close()
        self.epoch, self.order_pos, self.open, self.rr, self.epoch_usable = epoch, 0, [], 0, 0
        self._order_cache = self._order(epoch)
        while len(self.open) < self.cycle_length and self.order_pos < len(self._order_cache):
            self.open.append(self._next_cursor())

    def _next_cursor(self) -> list[int]:
        shard = self._order_cache[self.order_pos]
        self.order_pos += 1
        return [shard, 0, 0]  # shard, byte offset of the next sample, its index

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order_pos": self.order_pos, "open": copy.deepcopy(self.open),
                "rr": self.rr, "epoch_usable": self.epoch_usable}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.close()
        self.epoch, self.order_pos = int(state["epoch"]), int(state["order_pos"])
        self.open = [[int(v) for v in c] for c in state["open"]]
        self.rr, self.epoch_usable = int(state["rr"]), int(state["epoch_usable"])
        self._order_cache = self._order(self.epoch)
        for shard, _, _ in self.open:
            if shard not in self.mine:
                raise ValueError(f"resume state names shard {shard}, which is not one of this process's shards")

    def close(self) -> None:
        for gen, _ in self._gens.values():
            gen.close()
        self._gens = {}

    def _drop_slot(self, slot: int) -> None:
        shard = self.open[slot][0]
        gen = self._gens.pop(shard, None)
        if gen is not None:
            gen[0].close()
        if self.order_pos < len(self._order_cache):
            self.open[slot] = self._next_cursor()
            self.rr = slot
        else:
            del self.open[slot]
            self.rr = slot % len(self.open) if self.open else 0

    def next_sample(self) -> tuple[RawSample, int] | None:
        """The next sample and its epoch, or None once when an epoch ends (the next call starts
        the next epoch)."""
        while True:
            if not self.open:
                if self.epoch_usable == 0:
                    names = ", ".join(self.paths[i] for i in self.mine[:5])
                    raise RuntimeError(
                        f"epoch {self.epoch}: none of the {len(self.mine)} shards of process "
                        f"{self.process_index} ({names}{', ...' if len(self.mine) > 5 else ''}) "
                        "gave a usable sample; see the warnings above")
                self._begin_epoch(self.epoch + 1)
                return None
            slot = self.rr % len(self.open)
            shard, offset, index = self.open[slot]
            cached = self._gens.get(shard)
            if cached is None or cached[1] != offset:
                if cached is not None:
                    cached[0].close()
                cached = (iter_shard(self.paths[shard], shard, offset, index), offset)
            gen = cached[0]
            try:
                sample = next(gen)
            except StopIteration:
                self._gens.pop(shard, None)
                self._drop_slot(slot)
                continue
            except ShardError as e:
                self._gens.pop(shard, None)
                self.stats.skip("bad_shards" if e.kind == "bad" else "truncated_shards", str(e))
                self._drop_slot(slot)
                continue
            self.open[slot] = [shard, sample.next_start, sample.index + 1]
            self._gens[shard] = (gen, sample.next_start)
            self.rr = (slot + 1) % len(self.open)
            return sample, self.epoch

    def mark_usable(self) -> None:
        """Called by the consumer for each sample it could use (guards against endless empty epochs)."""
        self.epoch_usable += 1
