"""Atomic checkpoints: a SIGKILL while one is written leaves the previous one chosen and loadable;
only complete checkpoints are chosen; our portable.pt loads weights-only, refusing other objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_testlib import CodeRunningPayload, tiny_job

from condmoe.trainer.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints, resolve_checkpoint
from condmoe.trainer.ds_checkpoint import load_portable, storable

WORKER = Path(__file__).resolve().parent / "_ckpt_worker.py"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(job_file, tmp_path, fmnist_shards):
    job = job_file(tiny_job(fmnist_shards), "ck")
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, str(WORKER), str(job), "save-then-kill", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    root = tmp_path / "runs" / "ck" / "checkpoints"
    # the half-committed step 2 exists only as a dot-dir, never chosen
    assert (root / ".tmp-step-00000002" / "meta.json").is_file()
    assert [c.name for c in list_checkpoints(root)] == ["step-00000001"]
    assert latest_checkpoint(root).name == "step-00000001"
    assert resolve_checkpoint(tmp_path / "runs" / "ck").name == "step-00000001"
    p = subprocess.run([sys.executable, str(WORKER), str(job), "load", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["step"] == 1 and res["same_weights"] and res["latest"].endswith("step-00000001")
    assert res["portable_weights_only"]  # the step-3 portable state reads back through the safe readers
    # the next successful save cleans the stale temp dir
    assert not (root / ".tmp-step-00000002").exists()
    assert [c.name for c in list_checkpoints(root)] == ["step-00000001", "step-00000003"]


def test_resolve_and_keep_last_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (tmp_path / "step-00000009").mkdir()  # no meta.json: incomplete, ignored
    assert resolve_checkpoint(tmp_path).name == "step-00000003"
    CheckpointManager(tmp_path, keep_last=2)._prune()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


class _Engine:
    """Just enough engine for the topology check that picks the portable load."""

    def zero_optimization_stage(self) -> int:
        return 0


def _write(ckpt: Path, meta: dict) -> Path:
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


def test_portable_state_holding_an_object_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "ran"
    ckpt = _write(tmp_path / "step-00000001",
                  {"step": 1, "world_size": 2, "ep_size": 1, "zero_stage": 0, "portable": True})
    torch.save({"params": {}, "optim_keys": [], "evil": CodeRunningPayload(marker)}, ckpt / "portable.pt")
    torch.load(ckpt / "portable.pt", weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError) as err:  # another world size: the portable state is read
        CheckpointManager(tmp_path).load(_Engine(), ckpt, world_size=1, ep_size=1)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt / "portable.pt") in msg and "refused" in msg, msg
    assert "_touch" in msg  # names what it would have called
    assert not marker.exists()


def test_uncommitted_or_incomplete_checkpoints_are_never_chosen(tmp_path):
    root = tmp_path / "checkpoints"
    good = _write(root / "step-00000001", {"step": 1, "world_size": 1})
    (root / "step-00000002").mkdir()  # renamed but no meta.json
    (root / "step-00000002" / "portable.pt").write_bytes(b"")
    _write(root / ".tmp-step-00000003", {"step": 3, "world_size": 1})  # all written, never renamed
    _write(root / ".tmp-old-step-00000000", {"step": 0, "world_size": 1})  # being pruned
    _write(root / "step-3", {"step": 3, "world_size": 1})  # not our name
    assert list_checkpoints(root) == [good]
    assert latest_checkpoint(root) == good and CheckpointManager(root).latest() == good
    assert resolve_checkpoint(tmp_path) == good.resolve() and resolve_checkpoint(root) == good.resolve()
    with pytest.raises(FileNotFoundError, match="uncommitted"):
        resolve_checkpoint(root / ".tmp-step-00000003")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(root / "step-00000002")
    # pruning clears what crashes left and keeps only complete checkpoints
    _write(root / "step-00000004", {"step": 4, "world_size": 1})
    CheckpointManager(root, keep_last=1)._prune()
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-3"]


def test_portable_state_is_stored_as_plain_data(tmp_path):
    import numpy as np

    state = {"params": {"w": {"param": torch.ones(2, 3), "exp_avg": torch.zeros(2, 3)}},
             "optim_keys": ["exp_avg"], "optim_step": np.int64(7),
             "scheduler": {"betas": (0.9, 0.999), "last_batch_iteration": 6, "lr": np.float32(0.5)},
             "buffers": {}}
    out = storable(state)
    assert out["scheduler"] == {"betas": [0.9, 0.999], "last_batch_iteration": 6, "lr": 0.5}
    assert type(out["optim_step"]) is int
    torch.save(out, tmp_path / "portable.pt")
    back = load_portable(tmp_path / "portable.pt")  # weights_only=True
    assert torch.equal(back["params"]["w"]["param"], torch.ones(2, 3)) and back["optim_step"] == 7
    with pytest.raises(TypeError, match=r"portable state\['scheduler'\]\['fn'\] is a .*_Engine"):
        storable({"scheduler": {"fn": _Engine()}})
