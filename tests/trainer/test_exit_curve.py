"""Early-exit curves from one checkpoint in one pass equal separate evaluations at each threshold.

A tiny BasisNet and a tiny CoE train a few steps on Fashion-MNIST shards (one process, in a child
process so this one keeps no torch.distributed state); then the curve's endpoints (every image
exits / none does) and a middle threshold (about half exit) must give the same accuracy, exit rate
and average multiply-adds as ``evaluate_checkpoint`` run separately at that threshold (the model
built with it, the whole test split, MAdds counted by count_macs on every batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

# (family, thresholds of the curve, a threshold where every image exits, one where none does)
CASES = {
    "basisnet_cnn": ([round(0.05 * i, 2) for i in range(21)] + [1.01], 0.0, 1.01),
    "coe_cnn": ([round(0.02 * i, 2) for i in range(51)], 1.0, 0.0),
}


def _job(data: str, storage: str, model: str) -> dict:
    return {"model": {"name": model, "size": "tiny", "experts": 2},
            "data": {"path": data, "batch_size": 32, "eval_batch_size": 256},
            "optim": {"steps": 6, "lr": 0.005, "schedule": "constant"},
            "checkpoint": {"every": 6}, "metrics": {"log_every": 6},
            "cluster": {"storage_path": storage, "name": model, "workers": 1}}


def _main(data: str, storage: str, model: str, out: str) -> None:
    """Child process: train, one curve pass, then separate evaluations at three thresholds."""
    from condmoe.trainer.config import job_from_dict, resolve_paths
    from condmoe.trainer.evaluate import evaluate_checkpoint, exit_curve_checkpoint
    from condmoe.trainer.loop import train

    cfg = resolve_paths(job_from_dict(_job(data, storage, model)))
    train(cfg)
    thresholds, all_exit, none_exit = CASES[model]
    curve = exit_curve_checkpoint(cfg.run_dir, thresholds)
    mid = min(curve["curve"], key=lambda r: abs(r["exit_rate"] - 0.5))["threshold"]
    separate = {str(t): evaluate_checkpoint(cfg.run_dir, exit_threshold=t) for t in (all_exit, mid, none_exit)}
    never = evaluate_checkpoint(cfg.run_dir, exit_threshold=None)
    Path(out).write_text(json.dumps({"curve": curve, "mid": mid, "separate": separate, "never": never}))


@pytest.mark.parametrize("model", list(CASES))
def test_curve_equals_separate_evaluations(model, fmnist_shards, tmp_path):
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, __file__, str(fmnist_shards), str(tmp_path / "runs"), model, str(out)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    curve, separate = res["curve"], res["separate"]
    thresholds, all_exit, none_exit = CASES[model]
    n = curve["samples"]
    assert n == separate[str(all_exit)]["eval_samples"] == 768  # the whole test split, once
    by_t = {r["threshold"]: r for r in curve["curve"]}
    mid = by_t[res["mid"]]
    assert 0.0 < mid["exit_rate"] < 1.0, "no threshold splits the images: the middle point tests nothing"
    assert by_t[all_exit]["exit_rate"] == 1.0 and by_t[none_exit]["exit_rate"] == 0.0
    for t in (all_exit, res["mid"], none_exit):
        point, ev = by_t[t], separate[str(t)]
        assert point["exit_rate"] == pytest.approx(ev["eval_exit_rate"], abs=1e-12), t
        # the full model runs on a sub-batch in the separate evaluation: at most a float tie may differ
        assert point["accuracy"] == pytest.approx(ev["eval_accuracy"], abs=1.01 / n), t
        assert point["macs_per_sample"] == pytest.approx(ev["eval_macs_per_sample"], rel=1e-6), t
    # the endpoints: the lightweight stage alone and the full model (never exiting)
    assert curve["light"]["accuracy"] == pytest.approx(by_t[all_exit]["accuracy"])
    assert curve["full"]["accuracy"] == pytest.approx(res["never"]["eval_accuracy"], abs=1.01 / n)
    assert curve["full"]["macs_per_sample"] == pytest.approx(res["never"]["eval_macs_per_sample"], rel=1e-6)
    assert 0 < curve["light_macs"] < curve["full"]["macs_per_sample"]
    # cost falls as more images exit
    pts = sorted(curve["curve"], key=lambda r: r["exit_rate"])
    assert all(a["macs_per_sample"] >= b["macs_per_sample"] - 1e-6 for a, b in zip(pts, pts[1:]))


def test_cli_writes_json_and_parquet(fmnist_shards, tmp_path):
    """condmoe eval RUN --exit-thresholds: the curve as JSON on stdout and OUT.json / OUT.parquet."""
    import pyarrow.parquet as pq

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_exit_curve as t; "
            "from condmoe.trainer.config import job_from_dict, resolve_paths; "
            "from condmoe.trainer.loop import train; "
            "cfg = resolve_paths(job_from_dict(t._job(sys.argv[2], sys.argv[3], 'basisnet_cnn'))); "
            "cfg.optim.steps = 2; cfg.checkpoint.every = 2; train(cfg)")
    p = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(fmnist_shards),
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "basisnet_cnn"
    cli = [sys.executable, "-m", "condmoe.cluster.cli", "eval", str(run), "--exit-thresholds", "0,0.5,0.9,1.01",
           "--max-batches", "1"]
    p = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert [r["threshold"] for r in res["curve"]] == [0.0, 0.5, 0.9, 1.01]
    assert res["curve"][0]["exit_rate"] == 1.0 and res["curve"][-1]["exit_rate"] == 0.0
    assert pq.read_table(run / "exit_curve.parquet").num_rows == 4 and (run / "exit_curve.json").is_file()
    p = subprocess.run([*cli[:-2], "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0 and "threshold" in p.stdout and (tmp_path / "c.parquet").is_file(), p.stderr[-2000:]
    bad = subprocess.run([*cli[:5], "--exit-thresholds", "0.5,x"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert bad.returncode == 2 and "'x' is not a number" in bad.stderr


if __name__ == "__main__":
    _main(*sys.argv[1:5])
