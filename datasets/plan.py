"""The order of an epoch and who reads what: pure functions of (seed, epoch, counts, topology).

The epoch sequence ``seq(e)`` lists (shard, index-in-shard) pairs: first the ``carry``
samples left over from epoch e-1 (the tail of ``perm(e-1)``), then ``perm(e)``: the
shards in a seeded order, cut into windows of ``mix_shards`` shards whose samples are
shuffled together. Nothing depends on
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


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order shards are visited in ``epoch``: int64 (S,)."""
    if not shuffle:
        return np.arange(num_shards, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards).astype(np.int64)


def epoch_permutation(counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True,
                      mix_shards: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``perm(epoch)``: (shard ids int64 (N,), indices within the shard int64 (N,)); N = sum(counts).

    Shards are taken in :func:`shard_order` in windows of ``mix_shards``; the samples of a
    window are shuffled together, so a batch mixes that many shards even when each shard
    holds one class (a deterministic stand-in for webdataset's shuffle buffer).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if epoch < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if mix_shards < 1:
        raise ValueError(f"mix_shards must be >= 1, got {mix_shards}")
    order = shard_order(len(counts), seed, epoch, shuffle)
    shards, index = [], []
    for g in range(0, len(order), mix_shards):
        window = order[g : g + mix_shards]
        sh = np.repeat(window, counts[window])
        ix = np.concatenate([np.arange(counts[s], dtype=np.int64) for s in window]) if len(window) else sh
        if shuffle:
            p = np.random.default_rng([seed, epoch, 0x3141, g]).permutation(len(sh))
            sh, ix = sh[p], ix[p]
        shards.append(sh)
        index.append(ix)
    if not shards:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(shards).astype(np.int64), np.concatenate(index).astype(np.int64)


def window_ends(counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True, mix_shards: int = 1) -> np.ndarray:
    """Positions in perm(epoch) where a window of ``mix_shards`` shards ends: int64 (ceil(S / mix),)."""
    sizes = np.asarray(counts, dtype=np.int64)[shard_order(len(counts), seed, epoch, shuffle)]
    last = np.arange(mix_shards - 1, len(sizes), mix_shards)
    if len(sizes) % mix_shards:
        last = np.append(last, len(sizes) - 1)
    return np.cumsum(sizes)[last]


def epoch_sequence(counts: Sequence[int], seed: int, epoch: int, carry: int = 0, shuffle: bool = True,
                   mix_shards: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``seq(epoch)`` = last ``carry`` items of perm(epoch-1) + perm(epoch); arrays of length carry + N."""
    shards, index = epoch_permutation(counts, seed, epoch, shuffle, mix_shards)
    if carry:
        if carry > len(shards):
            raise ValueError(f"carry {carry} exceeds the {len(shards)} samples of an epoch")
        ps, pi = epoch_permutation(counts, seed, epoch - 1, shuffle, mix_shards)
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
