"""`deepspeed.bf16: true` is a job field that trains (on the CPU here; tests/gpu/ runs it on a GPU).

DeepSpeed's CPU accelerator supports bf16: the engine casts the model to bfloat16, the loop
casts each batch to the engine's dtype, the routers keep fp32 logits. The run's checkpoints
(ZeRO 1: bf16 keeps fp32 master weights there) resume in float32 at ZeRO 0 through the
portable state, and back in bf16 again: the dtype / stage change a GPU -> CPU -> GPU resume makes.
"""

from __future__ import annotations

import math

import pytest

from condmoe.trainer.checkpoint import read_meta

from trainer_testlib import run_workers

pytestmark = [pytest.mark.slow]


def _job(data, steps: int, bf16: bool) -> dict:
    return {"model": {"name": "condconv_cnn", "size": "tiny", "experts": 4},
            "data": {"path": str(data), "batch_size": 32, "eval_batch_size": 128},
            "optim": {"steps": steps, "lr": 0.003, "schedule": "constant"},
            "deepspeed": {"bf16": bf16, "zero_stage": 2},
            "checkpoint": {"every": 2, "keep_last": 2},
            "metrics": {"log_every": 1, "eval_batches": 1},
            "cluster": {"name": "bf16"}}


def test_bf16_job_trains_and_resumes_in_fp32_and_back(job_file, tmp_path, fmnist_shards):
    bf16 = run_workers(job_file(_job(fmnist_shards, 3, True), "bf16"), 1, tmp_path / "a.json")
    assert bf16["step"] == 3 and all(math.isfinite(v) for v in bf16["losses"].values())
    assert 0.0 <= bf16["eval"]["eval_accuracy"] <= 1.0 and bf16["eval"]["eval_macs_per_sample"] > 0
    meta = read_meta(bf16["checkpoint"])
    assert meta["zero_stage"] == 1 and meta["portable"]  # bf16 on one worker: ZeRO 1 (fp32 master weights)

    fp32 = run_workers(job_file(_job(fmnist_shards, 5, False), "fp32"), 1, tmp_path / "b.json")
    assert fp32["resumed_from"] == bf16["checkpoint"] and sorted(fp32["losses"]) == [4, 5]
    assert read_meta(fp32["checkpoint"])["zero_stage"] == 0
    assert all(math.isfinite(v) for v in fp32["losses"].values())

    again = run_workers(job_file(_job(fmnist_shards, 6, True), "again"), 1, tmp_path / "c.json")
    assert again["resumed_from"] == fp32["checkpoint"] and sorted(again["losses"]) == [6]
    assert math.isfinite(again["losses"][6]) and read_meta(again["checkpoint"])["zero_stage"] == 1
