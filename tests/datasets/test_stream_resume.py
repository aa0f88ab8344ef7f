"""Exact resume: stop anywhere, rebuild from the state, continue; also across a change of world size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ds_helpers import expected_keys, read_epoch

from condmoe.datasets import StreamingLoader
from condmoe.datasets.plan import window_ends


def _run(folder, world_size: int, batch: int, *, state: dict | None = None, stop_after: int | None = None,
         num_workers: int = 0, augment: bool = False, seed: int = 7):
    """Run every rank for ``stop_after`` steps (or to the end); return (per-rank keys, images, state)."""
    keys, images, states = [], [], []
    for r in range(world_size):
        ld = StreamingLoader(folder, "train", batch, rank=r, world_size=world_size, num_workers=num_workers,
                             augment=augment, seed=seed)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint stores
            ld.set_epoch(state["epoch"])  # a trainer's usual call: must keep the resumed position
        k, im = [], []
        for n, b in enumerate(ld, 1):
            k += b.keys
            im.append(b.images)
            if stop_after is not None and n == stop_after:
                break
        keys.append(k)
        images.append(torch.cat(im) if im else torch.zeros(0))
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states)  # every rank saves the same global position
    return keys, images, states[0]


def _boundary_seed(folder) -> int:
    """A seed whose first shard window (4 shards of 100) ends at position 400 (the short shard comes later)."""
    ld = StreamingLoader(folder, "train", 1)
    counts = [s.samples for s in ld.shards]
    return next(seed for seed in range(7, 60) if window_ends(counts, seed, 0, True, ld.mix_shards)[0] == 400)


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (2, 2)])
def test_resume_same_topology_continues_in_the_same_order(digits_dir, world_size, num_workers):
    seed, batch = _boundary_seed(digits_dir), 25
    boundary = 400 // (world_size * batch)  # the reader then stands exactly where the first shard window ends
    full_keys, full_imgs, _ = _run(digits_dir, world_size, batch, num_workers=num_workers, augment=True, seed=seed)
    for stop in (1, 3, boundary):  # mid-shard and on a shard(-window) boundary
        before, imgs_a, state = _run(digits_dir, world_size, batch, stop_after=stop, num_workers=num_workers,
                                     augment=True, seed=seed)
        assert state["epoch"] == 0 and state["position"] == stop * world_size * batch
        after, imgs_b, end = _run(digits_dir, world_size, batch, state=state, num_workers=num_workers, augment=True,
                                  seed=seed)
        for r in range(world_size):
            assert before[r] + after[r] == full_keys[r]
            # augmentation is seeded by global position: the resumed images are identical too
            torch.testing.assert_close(torch.cat([imgs_a[r], imgs_b[r]]), full_imgs[r], rtol=0, atol=0)
        assert end["epoch"] == 1 and end["position"] == 0


@pytest.mark.parametrize("old, new", [(2, 3), (3, 1)])
def test_resume_with_another_world_size_reads_each_sample_once(digits_dir, old, new):
    batch = 16
    ref = StreamingLoader(digits_dir, "train", batch, seed=7)
    epoch = expected_keys(ref)
    stop = 7
    before, _, state = _run(digits_dir, old, batch, stop_after=stop)
    after, _, _ = _run(digits_dir, new, batch, state=state)
    read = [k for r in before + after for k in r]
    assert len(read) == len(set(read))  # each sample read once
    assert set(read) <= set(epoch)
    n_after = len(read) - stop * old * batch
    assert n_after == (1258 - stop * old * batch) // (new * batch) * new * batch  # every full global batch was read
    assert 1258 - len(read) < new * batch  # what is left over is less than one global batch
    # the samples after the resume are exactly the rest of the epoch sequence, whatever the new order
    assert {k for r in after for k in r} == set(epoch[stop * old * batch : stop * old * batch + n_after])
    # and with the same new topology the resumed stream is deterministic
    again, _, _ = _run(digits_dir, new, batch, state=state)
    assert again == after


def test_resume_with_another_batch_size_and_workers(digits_dir):
    before, _, state = _run(digits_dir, 1, 20, stop_after=4)
    after, _, _ = _run(digits_dir, 1, 30, state=state, num_workers=2)
    ref = expected_keys(StreamingLoader(digits_dir, "train", 30, seed=7))
    assert before[0] + after[0] == ref[: len(before[0]) + len(after[0])]


def test_carry_state_survives_a_resume(digits_dir):
    ld = StreamingLoader(digits_dir, "train", 100, seed=3, remainder="carry")
    read_epoch(ld)
    first = read_epoch(ld, stop_after=5)
    state = ld.state_dict()
    assert state["carry"] == 58 and state["epoch"] == 1 and state["position"] == 500
    rest_ld = StreamingLoader(digits_dir, "train", 50, seed=3, remainder="carry")
    rest_ld.load_state_dict(state)
    assert rest_ld.batches_remaining == (1258 + 58 - 500) // 50
    whole = StreamingLoader(digits_dir, "train", 100, seed=3, remainder="carry")
    whole.set_epoch(1)
    full = read_epoch(whole)
    assert first + read_epoch(rest_ld) == full  # batch 50 after batch 100: the same sequence


def test_bad_states_are_rejected(digits_dir):
    ld = StreamingLoader(digits_dir, "train", 16, seed=7)
    good = ld.state_dict()
    with pytest.raises(ValueError, match="is for 999 samples"):
        ld.load_state_dict({**good, "num_samples": 999})
    with pytest.raises(ValueError, match=r"\(8, True, 4\)"):
        ld.load_state_dict({**good, "seed": 8})
    with pytest.raises(ValueError, match="position 5000"):
        ld.load_state_dict({**good, "position": 5000})
    with pytest.raises(ValueError, match="lacks 'epoch'"):
        ld.load_state_dict({k: v for k, v in good.items() if k != "epoch"})
    assert len(json.dumps(good)) < 200


def test_state_saved_after_the_last_batch_of_an_epoch(digits_dir):
    ld = StreamingLoader(digits_dir, "train", 100, seed=7)
    it = iter(ld)
    for _ in range(len(ld)):
        next(it)  # a trainer checkpoints here, before asking for more
    state = ld.state_dict()
    assert state["epoch"] == 0 and state["position"] == 1200
    resumed = StreamingLoader(digits_dir, "train", 100, seed=7)
    resumed.load_state_dict(state)
    assert list(resumed) == [] and resumed.state_dict()["epoch"] == 1  # empty pass, then epoch 1
    resumed.set_epoch(1)  # what a loop counting epochs by StopIteration calls next: no reset
    fresh = StreamingLoader(digits_dir, "train", 100, seed=7)
    fresh.set_epoch(1)
    assert read_epoch(resumed) == read_epoch(fresh)
