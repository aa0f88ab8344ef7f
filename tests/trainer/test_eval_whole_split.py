"""Evaluation counts every image of the split once, on any worker count (uneven last batch padded
and masked), and gives the same accuracy on 2 expert-parallel workers as on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from condmoe.datasets.manifest import read_manifest
from condmoe.trainer.records import read_jsonl

from trainer_testlib import run_workers, tiny_job

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def test_whole_split_on_two_workers_equals_one_process(job_file, tmp_path, fmnist_shards):
    test_images = sum(s.samples for s in read_manifest(fmnist_shards).split("test"))
    # 100 images per rank per batch: the last global batch of the split is partial on both ranks
    assert test_images % 200
    job = tiny_job(fmnist_shards, "test_moe_cnn", steps=2, every=2, ep_size=2)
    job["data"]["eval_batch_size"] = 100
    job["metrics"]["eval_batches"] = None
    res = run_workers(job_file(job), 2, tmp_path / "two.json")
    assert res["eval"]["eval_samples"] == test_images
    run_dir = tmp_path / "runs" / "job"
    evals = read_jsonl(run_dir / "metrics.jsonl", "eval")
    assert [e["samples"] for e in evals] == [test_images]
    # the same checkpoint on one process (ep 2 -> 1 through the portable state), other batch size
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import tiny_models; "
            "from condmoe.trainer import evaluate_checkpoint; "
            "print(json.dumps(evaluate_checkpoint(sys.argv[2])))")
    p = subprocess.run([sys.executable, "-c", code, str(HERE), str(run_dir)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads(p.stdout.strip().splitlines()[-1])
    assert one["eval_samples"] == test_images
    assert one["eval_accuracy"] == pytest.approx(res["eval"]["eval_accuracy"], abs=0.5 / test_images)
