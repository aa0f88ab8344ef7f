"""The sharded portable state (trainer/sharded_state.py over trainer/dcp_slices.py): each rank writes
only the slices it owns, a load reads only the stored chunks its partition overlaps, re-sharding
reproduces the state exactly, and reading someone else's checkpoint runs no code."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from trainer_testlib import CodeRunningPayload, rank_env, tiny_job

from condmoe.trainer import dcp_slices
from condmoe.trainer.checkpoint import CheckpointManager, list_checkpoints, read_meta
from condmoe.trainer.dcp_slices import INDEX, Slice, read_full, read_index, read_slices, write_slices
from condmoe.trainer.ds_checkpoint import _EXPERT, read_portable
from condmoe.trainer.engine import free_port
from condmoe.trainer.sharded_state import SHARDED_DIR

WORKER = Path(__file__).resolve().parent / "_sharded_worker.py"

A, B, C = torch.arange(10.0), torch.arange(12.0).view(3, 4), torch.arange(5)


def _write_two_ranks(rank: int, port: int, directory: str) -> None:
    """Rank 0 owns A[0:6] and B; rank 1 owns A[6:10] and C (a gloo group of two, no DeepSpeed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:
        slices = {"param/a": Slice(A[:6], 0, 10), "param/b": Slice(B, 0, 12)}
    else:
        slices = {"param/a": Slice(A[6:], 6, 10), "buffer/c": Slice(C, 0, 5)}
    write_slices(Path(directory), slices, {"shapes": {"a": [10], "b": [3, 4], "c": [5]}})
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_state(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sharded") / SHARDED_DIR
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_write_two_ranks, args=(r, port, str(directory))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return directory


def _recording_reads(monkeypatch) -> list:
    """Every stored range a load reads: [key, first element, elements]."""
    reads: list = []
    plain = dcp_slices._Reader.read_data

    def recording(self, plan, planner):
        for item in plan.items:
            reads.append([item.storage_index.fqn, item.storage_index.offset[0] + item.storage_offsets[0],
                          item.lengths[0]])
        return plain(self, plan, planner)

    monkeypatch.setattr(dcp_slices._Reader, "read_data", recording)
    return reads


def test_each_rank_file_holds_only_its_slices(two_rank_state):
    index = read_index(two_rank_state)
    where = {fqn: [(c["file"], c["offset"], c["length"]) for c in t["chunks"]] for fqn, t in index["tensors"].items()}
    assert where == {"param/a": [("__0_0.distcp", 0, 6), ("__1_0.distcp", 6, 4)],
                     "param/b": [("__0_0.distcp", 0, 12)], "buffer/c": [("__1_0.distcp", 0, 5)]}
    assert index["tensors"]["buffer/c"]["dtype"] == "int64"
    assert sorted(p.name for p in two_rank_state.iterdir()) == ["__0_0.distcp", "__1_0.distcp", INDEX]  # no pickle
    for rank, elements in ((0, 6 * 4 + 12 * 4), (1, 4 * 4 + 5 * 8)):
        chunks = [c for t in index["tensors"].values() for c in t["chunks"] if c["file"] == f"__{rank}_0.distcp"]
        size = (two_rank_state / f"__{rank}_0.distcp").stat().st_size
        assert size == sum(c["bytes"] for c in chunks)  # the file is exactly its chunks
        assert elements <= size < elements + 2048 * len(chunks)  # each chunk: its bytes + a torch.save header
    full = read_full(two_rank_state)
    assert torch.equal(full["param/a"], A) and torch.equal(full["param/b"], B) and torch.equal(full["buffer/c"], C)


def test_a_load_reads_only_the_chunks_it_overlaps(two_rank_state, monkeypatch):
    reads = _recording_reads(monkeypatch)
    index = read_index(two_rank_state)
    part = torch.full((3,), -1.0)  # elements 5..7 of a: the end of rank 0's chunk, the start of rank 1's
    b_t = torch.empty(4, 3).t()  # a non-contiguous target (B's shape, transposed storage)
    read_slices(two_rank_state, {"param/a": Slice(part, 5, 10), "param/b": Slice(b_t, 0, 12)}, index, alone=True)
    assert torch.equal(part, A[5:8]) and torch.equal(b_t, B) and not b_t.is_contiguous()
    assert sorted(reads) == [["param/a", 5, 1], ["param/a", 6, 2], ["param/b", 0, 12]]  # nothing of c
    with pytest.raises(ValueError, match="holds 10 elements, the model 11"):
        read_slices(two_rank_state, {"param/a": Slice(torch.empty(11), 0, 11)}, index, alone=True)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_reading_a_foreign_sharded_state_runs_no_code(two_rank_state, tmp_path):
    marker = tmp_path / "ran"
    evil = _copy(two_rank_state, tmp_path / "evil")
    # DCP's own reader unpickles .metadata: planted here, condmoe's reader never opens it
    with open(evil / ".metadata", "wb") as f:
        pickle.dump(CodeRunningPayload(marker), f)
    assert torch.equal(read_full(evil)["param/b"], B) and not marker.exists()
    from torch.distributed.checkpoint import FileSystemReader

    with contextlib.suppress(AttributeError):  # (it then trips over the payload's return value)
        FileSystemReader(evil).read_metadata()  # the risk is live: stock DCP runs it
    assert marker.exists()
    marker.unlink()
    # a chunk that is a pickled object instead of a tensor: refused by the weights-only load
    buf = io.BytesIO()
    torch.save(CodeRunningPayload(marker), buf)
    index = json.loads((evil / INDEX).read_text())
    c = index["tensors"]["param/b"]["chunks"][0]
    with open(evil / c["file"], "ab") as f:
        c["at"], c["bytes"] = f.tell(), len(buf.getvalue())
        f.write(buf.getvalue())
    (evil / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        read_full(evil)
    msg = str(err.value)
    assert "\n" not in msg and "refused" in msg and "_touch" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("change, error", [
    (lambda t: t["param/a"]["chunks"][1].update(file="../../outside.distcp"), "not a __R_N.distcp name"),
    (lambda t: t["param/a"].update(dtype="object"), "unknown dtype"),
    (lambda t: t["param/a"]["chunks"][1].update(offset=5), "gap or overlap at element 6"),
    (lambda t: t["param/a"]["chunks"].pop(), "cover 6 of 10"),
    (lambda t: t["param/a"]["chunks"][0].update(at="0"), "malformed chunk"),
])
def test_a_tampered_index_is_refused(two_rank_state, tmp_path, change, error):
    bad = _copy(two_rank_state, tmp_path / "bad")
    index = json.loads((bad / INDEX).read_text())
    change(index["tensors"])
    (bad / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=error):
        read_index(bad)


def test_load_state_refuses_a_tampered_sharded_checkpoint_before_touching_the_engine(two_rank_state, tmp_path):
    ckpt = tmp_path / "step-00000001"
    _copy(two_rank_state, ckpt / SHARDED_DIR)
    (ckpt / SHARDED_DIR / INDEX).write_text(json.dumps({"format": "something-else"}))
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "world_size": 2, "ep_size": 1, "zero_stage": 2,
                                                "portable": True, "portable_format": "sharded"}))

    class Engine:  # a wrong-topology checkpoint goes to the portable state; nothing else is called
        def zero_optimization_stage(self) -> int:
            return 0

    with pytest.raises(ValueError, match="not a condmoe sharded state"):
        CheckpointManager(tmp_path).load(Engine(), ckpt, world_size=1, ep_size=1)


# ---------------------------------------------------------------- real DeepSpeed engines (gloo)
def _run(world: int, job: Path, mode: str, root: Path, out: Path, *overrides: str) -> list[dict]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(job), mode, str(root), str(out),
                                       *overrides], env=rank_env(rank, world, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def _same_state(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name, entry in a["params"].items():
        assert entry.keys() == b["params"][name].keys(), name
        for k, t in entry.items():
            assert torch.equal(t, b["params"][name][k]), f"{name} {k}"
    assert a["optim_keys"] == b["optim_keys"] and a["optim_step"] == b["optim_step"] == 2
    assert a["scheduler"] == b["scheduler"]


def _expert(key: str) -> int | None:
    m = _EXPERT.match(key.split("/", 1)[1])
    return int(m.group(2)) if m else None


def _inside(reads: list, owned: dict) -> bool:
    return all(owned[k][0] <= start and start + n <= owned[k][0] + owned[k][1] for k, start, n in reads)


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_ranks_write_their_partitions_and_reshard_exactly(job_file, tmp_path, fmnist_shards):
    """2 workers, ZeRO 2, ep 2 (experts 0-1 on rank 0, 2-3 on rank 1) save after two steps; the state
    re-sharded onto 1 worker (ep 1, ZeRO 0) and onto 2 workers at ZeRO 1 is the saved one, bit for bit."""
    job = job_file({**tiny_job(fmnist_shards, "test_moe_cnn", ep_size=2), "deepspeed": {"zero_stage": 2}})
    root = tmp_path / "ck"
    saved = _run(2, job, "save", root, tmp_path / "save")
    ckpt = list_checkpoints(root)[-1]
    assert read_meta(ckpt)["portable_format"] == "sharded" and not (ckpt / "portable.pt").exists()
    index = read_index(ckpt / SHARDED_DIR)
    for rank, res in enumerate(saved):  # rank r's file holds exactly the slices it owns
        in_file = {fqn: [c["offset"], c["length"]] for fqn, t in index["tensors"].items()
                   for c in t["chunks"] if c["file"] == f"__{rank}_0.distcp"}
        assert in_file == res["owned"], rank
        assert {_expert(k) for k in in_file} - {None} == {2 * rank, 2 * rank + 1}
    split = [k for k, t in index["tensors"].items() if len({c["file"] for c in t["chunks"]}) == 2]
    assert split and all(_expert(k) is None for k in split)  # ZeRO 2: dense tensors in fragments
    ref = torch.load(tmp_path / "save.state.pt", weights_only=True)  # consolidated after the save
    _same_state(read_portable(ckpt), ref)

    one = _run(1, job, "load", root, tmp_path / "one", "model.ep_size=1")  # ZeRO 0: rank 0 needs all
    _same_state(torch.load(tmp_path / "one.state.pt", weights_only=True), ref)
    assert sum(n for _, _, n in one[0]["reads"]) == sum(t["numel"] for t in index["tensors"].values())

    two = _run(2, job, "load", root, tmp_path / "two", "deepspeed.zero_stage=1")
    _same_state(torch.load(tmp_path / "two.state.pt", weights_only=True), ref)
    assert one[0]["working_weights_restored"] and all(r["working_weights_restored"] for r in two)
    for rank, res in enumerate(two):  # reads inside its partition, never the other ep rank's experts
        assert res["reads"] and _inside(res["reads"], res["owned"]), rank
        assert {_expert(k) for k, _, _ in res["reads"]} - {None} == {2 * rank, 2 * rank + 1}
        assert sum(n for _, _, n in res["reads"]) == sum(n for _, n in res["owned"].values())
