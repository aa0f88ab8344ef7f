"""The order of an epoch and who reads what: pure functions of (seed, epoch, counts, topology).

The epoch sequence ``seq(e)`` lists (shard, index-in-shard) pairs: first the ``carry``
samples left over from epoch e-1 (the tail of ``perm(e-1)``), then ``perm(e)``: the
shards in a seeded order, each shard's samples in a seeded order. Nothing depends on
timing, the number of ranks or the number of loader workers.

Global step ``t`` of a run that starts at global position ``p0`` with ``W`` ranks and
per-rank batch ``B`` consumes ``seq[p0 + t*W*B : p0 + (t+1)*W*B]``; rank ``r`` takes the
``r``-th block of ``B`` in it, and loader worker ``w`` of ``nw`` produces the steps
``t = w, w + nw, ...`` (the torch DataLoader hands batches back round-robin, so the
stream a rank sees is the same for any ``nw``). Every rank runs
``(len(seq) - p0) // (W*B)`` steps; the resume state is just ``(epoch, p0 + steps*W*B,
carry)``, valid for any new W, B or nw: the rest of the epoch is ``seq[p:]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_permutation(counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``perm(epoch)``: (shard ids int64 (N,), indices within the shard int64 (N,)); N = sum(counts)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if epoch < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    shard_order = np.arange(len(counts))
    if shuffle:
        shard_order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(counts))
    shards = np.repeat(shard_order, counts[shard_order])
    index = np.empty(n, np.int64)
    at = 0
    for s in shard_order:
        c = int(counts[s])
        index[at : at + c] = np.random.default_rng([seed, epoch, 1 + int(s)]).permutation(c) if shuffle else np.arange(c)
        at += c
    return shards.astype(np.int64), index


def epoch_sequence(counts: Sequence[int], seed: int, epoch: int, carry: int = 0,
                   shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``seq(epoch)`` = last ``carry`` items of perm(epoch-1) + perm(epoch); arrays of length carry + N."""
    shards, index = epoch_permutation(counts, seed, epoch, shuffle)
    if carry:
        if carry > len(shards):
            raise ValueError(f"carry {carry} exceeds the {len(shards)} samples of an epoch")
        ps, pi = epoch_permutation(counts, seed, epoch - 1, shuffle)
        shards = np.concatenate([ps[-carry:], shards])
        index = np.concatenate([pi[-carry:], index])
    return shards, index


def steps_in(length: int, position: int, global_batch: int, pad: bool = False) -> int:
    """Global batches left in a sequence of ``length`` from ``position``: full ones, or all when ``pad``."""
    left = max(0, length - position)
    return -(-left // global_batch) if pad else left // global_batch


def carry_for_epoch(total: int, epoch: int, global_batch: int) -> int:
    """Samples carried into ``epoch`` when every epoch so far ran with ``global_batch`` (remainder='carry')."""
    carry = 0
    for _ in range(epoch):
        carry = (carry + total) % global_batch
    return carry


def rank_positions(position: int, step: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Positions in seq(e) of rank ``rank``'s batch at global ``step`` from start ``position``: int64 (B,)."""
    start = position + step * world_size * batch_size + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)
