"""Epoch order: exactly-once over ranks and loader workers, pure function of (seed, epoch), equal steps."""

from __future__ import annotations

import numpy as np
import pytest
from ds_helpers import expected_keys, read_epoch

from condmoe.datasets import StreamingLoader

B = 16  # per-rank batch; digits train has 1258 samples in 13 shards


@pytest.mark.multiproc
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_for_any_ranks_and_workers(digits_dir, world_size):
    per_workers = {}
    for nw in (0, 1, 2):
        ranks = [StreamingLoader(digits_dir, "train", B, rank=r, world_size=world_size, num_workers=nw, seed=5)
                 for r in range(world_size)]
        steps = {len(ld) for ld in ranks}
        assert steps == {1258 // (B * world_size)}
        epoch = expected_keys(ranks[0])
        streams = [read_epoch(ld) for ld in ranks]
        assert [len(s) for s in streams] == [B * len(ranks[0])] * world_size  # equal steps on every rank
        union = [k for s in streams for k in s]
        assert len(union) == len(set(union))  # no repeats across ranks and workers
        assert set(union) == set(epoch[: len(union)])  # exactly the epoch's first T*W*B samples
        assert len(set(epoch)) == 1258
        per_workers[nw] = streams
    # the stream each rank sees does not depend on the number of loader workers
    assert per_workers[0] == per_workers[1] == per_workers[2]


def test_order_is_a_function_of_seed_and_epoch(digits_dir):
    def epoch_keys(seed: int, epoch: int) -> list[str]:
        ld = StreamingLoader(digits_dir, "train", 32, seed=seed)
        ld.set_epoch(epoch)
        return read_epoch(ld)

    a = epoch_keys(1, 0)
    assert a == epoch_keys(1, 0)
    assert a != epoch_keys(2, 0) and a != epoch_keys(1, 1)
    assert set(a) != set(epoch_keys(1, 1))  # the dropped remainder differs between epochs too
    # rank streams interleave the single-rank stream block by block
    r0, r1 = (read_epoch(StreamingLoader(digits_dir, "train", 16, rank=r, world_size=2, seed=1)) for r in (0, 1))
    assert [k for i in range(len(r0) // 16) for k in r0[16 * i : 16 * i + 16] + r1[16 * i : 16 * i + 16]] == a[: 2 * len(r0)]


def test_unshuffled_order_follows_the_manifest(digits_dir):
    keys = read_epoch(StreamingLoader(digits_dir, "test", 359, shuffle=False))
    ld = StreamingLoader(digits_dir, "test", 359, shuffle=False)
    assert keys == expected_keys(ld) and keys == sorted(keys)  # the test split is written in source order


def test_iterating_on_moves_to_the_next_epoch_and_carry_keeps_the_remainder(digits_dir):
    ld = StreamingLoader(digits_dir, "train", 100, world_size=1, seed=2, remainder="carry")
    assert len(ld) == 12
    first = read_epoch(ld)
    left = set(expected_keys(StreamingLoader(digits_dir, "train", 100, seed=2))) - set(first)
    assert len(left) == 58 and ld.state_dict()["epoch"] == 1 and ld.carry == 58
    assert len(ld) == (58 + 1258) // 100
    second = read_epoch(ld)
    assert set(second[:58]) == left  # the 58 samples epoch 0 could not fit come first in epoch 1
    dropped = StreamingLoader(digits_dir, "train", 100, seed=2)
    read_epoch(dropped)
    assert dropped.carry == 0 and not set(read_epoch(dropped)[:58]) == left
    # set_epoch to a later epoch gives the same carry as iterating there
    jump = StreamingLoader(digits_dir, "train", 100, seed=2, remainder="carry")
    jump.set_epoch(1)
    assert jump.carry == 58 and read_epoch(jump) == second


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 2, "world_size": 2}, "rank must be in"),
    ({"remainder": "wrap"}, "remainder must be one of"),
    ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
])
def test_bad_loader_arguments_name_the_value(digits_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingLoader(digits_dir, "train", 8, **kwargs)


@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (3, 2)])
def test_pad_reads_every_sample_once_with_equal_steps(digits_dir, world_size, num_workers):
    valid_keys, pads, steps = [], 0, set()
    for r in range(world_size):
        ld = StreamingLoader(digits_dir, "val", 16, rank=r, world_size=world_size, num_workers=num_workers,
                             remainder="pad", shuffle=False)
        n = 0
        for batch in ld:
            batch = batch.to("cpu")
            assert batch.valid.tolist() == ["#pad" not in k for k in batch.keys]
            assert (batch.labels[~batch.valid] == 0).all()
            valid_keys += [k for k, v in zip(batch.keys, batch.valid.tolist()) if v]
            pads += int((~batch.valid).sum())
            n += 1
        assert n == len(ld) == -(-180 // (16 * world_size))
        steps.add(n)
    assert len(steps) == 1 and pads == steps.pop() * 16 * world_size - 180
    assert len(valid_keys) == len(set(valid_keys)) == 180


def test_too_large_batch_and_unknown_split_are_errors(digits_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        StreamingLoader(tmp_path, "train", 8)  # a folder without a manifest is never taken for a shard set
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StreamingLoader(digits_dir, "val", 100, world_size=2)
    with pytest.raises(ValueError, match="split 'dev' has no shards"):
        StreamingLoader(digits_dir, "dev", 8)


def test_mix_shards_mixes_class_sorted_shards(tmp_path):
    import webdataset as wds

    from condmoe.datasets.idx import load_digits_images

    x, y = load_digits_images(limit=800)
    order = np.argsort(y, kind="stable")  # class-sorted: each shard of 50 holds one or two classes
    with wds.ShardWriter(str(tmp_path / "sorted-%06d.tar"), maxcount=50, verbose=0) as sink:
        for i in order:
            sink.write({"__key__": f"s{i:05d}", "png": x[i], "cls": int(y[i])})
    pattern = str(tmp_path / "sorted-{000000..000015}.tar")

    def classes_per_batch(mix: int) -> float:
        ld = StreamingLoader(pattern, "train", 20, seed=3, mix_shards=mix)
        return float(np.mean([len(set(b.labels.tolist())) for b in ld]))

    assert classes_per_batch(1) < 2.1 and classes_per_batch(4) > 3.0
    with pytest.raises(ValueError, match="mix_shards must be >= 1, got 0"):
        StreamingLoader(pattern, "train", 20, mix_shards=0)
