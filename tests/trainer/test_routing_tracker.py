"""RoutingTracker: each interval's steps summed over real gloo ranks in ONE all-reduce, run totals kept."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from datetime import timedelta

import pytest
import torch

from condmoe.routing import RoutingStats
from condmoe.trainer.engine import free_port
from condmoe.trainer.routing_tracker import RoutingTracker


def _stats(rank: int, step: int, layer: int, experts: int = 3, kind: str = "hard") -> RoutingStats:
    load = torch.arange(experts, dtype=torch.float64) * (rank + 1) + step + layer
    return RoutingStats.from_load(load, samples=10 * (rank + 1), dropped=rank, early_exits=step, kind=kind)


def _local_steps(rank: int) -> list[tuple[int, float, dict]]:
    """Steps 1..7. "gate" runs everywhere; "late" runs only on rank 1 at step 2 (and nowhere at step 3);
    "soft" appears on every rank from step 4 on (a layer the agreed layout does not hold yet)."""
    steps = []
    for step in range(1, 8):
        st = {"gate": _stats(rank, step, 0)}
        if rank == 1 and step == 2:
            st["late"] = _stats(rank, step, 1, experts=2)
        if step >= 4:
            st["soft"] = _stats(rank, step, 2, experts=4, kind="soft")
        steps.append((step, float(rank + step), st))
    return steps


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        tracker = RoutingTracker.from_state({"gate": _stats(0, 0, 9).as_dict()})  # restored totals
        results, counts = [], []
        for interval in ([1, 2, 3], [4, 5], [6, 7]):
            for step, loss, st in _local_steps(rank):
                if step in interval:
                    tracker.record(step, st, loss)
            before = tracker.collectives
            results += [(s, loss, {n: x.as_dict() for n, x in st.items()}) for s, loss, st in tracker.flush()]
            counts.append(tracker.collectives - before)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"results": results, "counts": counts, "totals": tracker.state_dict()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_one_allreduce_per_interval_sums_every_step_over_ranks(tmp_path):
    world, out = 2, str(tmp_path / "res")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [json.loads(open(f"{out}.{r}").read()) for r in range(world)]
    assert got[0] == got[1], "ranks disagree on the reduced stats"
    res = got[0]
    # the first interval agrees on the layout (all_gather_object), then ONE all-reduce; the second
    # meets the new "soft" layer: its flag costs a second all-reduce; a steady interval: exactly one
    assert res["counts"] == [1, 2, 1]
    want_totals: dict[str, RoutingStats] = {"gate": _stats(0, 0, 9)}
    for (step, loss, st) in res["results"]:
        assert loss == pytest.approx(sum(r + step for r in range(world)) / world)
        want = {}
        for r in range(world):
            for s, _, local in _local_steps(r):
                if s == step:
                    for n, x in local.items():
                        want[n] = want[n] + x if n in want else x
        assert set(st) == set(want), step  # "late" only at step 2: it ran on no rank elsewhere
        for n, x in want.items():
            assert st[n]["load"] == x.load.tolist() and st[n]["samples"] == x.samples
            assert st[n]["dropped"] == x.dropped and st[n]["early_exits"] == x.early_exits
            assert st[n]["kind"] == x.kind
            want_totals[n] = want_totals[n] + x if n in want_totals else x
    assert {n: d["load"] for n, d in res["totals"].items()} == {n: x.load.tolist() for n, x in want_totals.items()}


def test_steady_interval_is_one_collective_and_world_of_one_needs_none():
    tracker = RoutingTracker()
    tracker.record(1, {"gate": _stats(0, 1, 0)}, 2.0)
    tracker.record(2, {}, 3.0)
    out = tracker.flush()
    assert tracker.collectives == 0  # no process group: nothing to reduce
    assert [(s, loss, sorted(st)) for s, loss, st in out] == [(1, 2.0, ["gate"]), (2, 3.0, [])]
    assert tracker.totals["gate"].load.tolist() == _stats(0, 1, 0).load.tolist()
