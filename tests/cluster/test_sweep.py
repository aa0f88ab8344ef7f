"""condmoe sweep: trials on Ray Tune, one row each, resumable, a report; on embedded Ray and on a head node.

The grid parsing, trial naming and the report's table and plots are checked without Ray; the slow
tests run real sweeps of tiny jobs on Fashion-MNIST shards: a grid with 2 seeds (BasisNet, with its
exit curves) on the embedded Ray, a sweep killed mid-way and restarted (the finished trial is not
run again, the killed one resumes from its checkpoint), and a sweep submitted to a `ray start --head`
cluster with token auth.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from condmoe.cluster.cli import main
from condmoe.cluster.sweep import (SweepSpec, done_rows, make_spec, max_concurrent_trials, parse_grid,
                                   parse_variants, read_table, split_values, write_table)
from condmoe.cluster.sweep_report import pareto_front, summarize, write_sweep_report
from condmoe.trainer.config import ConfigError

from test_jobs import ray_head  # noqa: F401  (the token-auth head node fixture)

BIN = Path(sys.executable).parent


def _job(path: Path, data: str | Path, storage: Path, model: str = "condconv_cnn", steps: int = 4,
         every: int = 2) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": model, "size": "tiny", "experts": 2},
        "data": {"path": str(data), "batch_size": 32, "eval_batch_size": 256},
        "optim": {"steps": steps, "lr": 0.005, "schedule": "constant"},
        "checkpoint": {"every": every, "keep_last": 2},
        "metrics": {"log_every": 2, "prometheus": {"port": 0}},
        "cluster": {"workers": 1, "storage_path": str(storage)}}))
    return path


# --- without Ray --------------------------------------------------------------------------------------

def test_grid_values_and_variants_parse():
    assert split_values("1,4, 8") == ["1", "4", "8"]
    assert split_values("[1,2,4],[1,1,1],{a: 1, b: 2}") == ["[1,2,4]", "[1,1,1]", "{a: 1, b: 2}"]
    assert parse_grid(["model.experts=1,4,8", "optim.lr=0.1"]) == {"model.experts": ["1", "4", "8"],
                                                                 "optim.lr": ["0.1"]}
    for bad, msg in ((["model.experts"], "KEY=V1"), (["a=1", "a=2"], "twice"), (["seed=1,2"], "--seeds")):
        with pytest.raises(ValueError, match=msg):
            parse_grid(bad)
    assert parse_variants([["thin", "model.experts=1"], ["routed"]]) == {"thin": ["model.experts=1"], "routed": []}
    with pytest.raises(ValueError, match="name"):
        parse_variants([["a b"]])
    with pytest.raises(ValueError, match="twice"):
        parse_variants([["a"], ["a"]])


def test_trials_are_the_cross_product_with_stable_names(tmp_path, fmnist_shards):
    job = _job(tmp_path / "j.yaml", fmnist_shards, tmp_path / "runs")
    spec = make_spec(str(job), grid=["model.experts=1,4", "optim.lr=0.01,0.02"], seeds=2, name="s",
                     variants=[["plain"], ["wide", "model.size=small"]])
    trials = spec.trials()
    assert len(trials) == 2 * 2 * 2 * 2
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    assert ids == [t.trial_id for t in make_spec(str(job), grid=["model.experts=1,4", "optim.lr=0.01,0.02"],
                                                 seeds=2, name="s",
                                                 variants=[["plain"], ["wide", "model.size=small"]]).trials()]
    t = trials[-1]
    assert t.params == {"variant": "wide", "model.experts": 4, "optim.lr": 0.02, "seed": 1}
    assert t.trial_id.startswith("wide-experts4-lr0.02-s1-")
    cfg = spec.trial_job(t)
    assert cfg.run_name == f"s-{t.trial_id}" and cfg.model.size == "small" and cfg.model.experts == 4
    assert cfg.run_dir == (tmp_path / "runs" / "s" / "runs" / cfg.run_name).resolve()
    assert cfg.optim.seed == cfg.data.seed == 1 and cfg.metrics.eval_batches is None
    spec.save()
    assert SweepSpec.load(spec.dir).trials() == trials
    # a variant of another family starts from that family's default options, then its own
    other = make_spec(str(job), variants=[["static", "model.name=expert_cnn", "model.options.width=1.5"]],
                      overrides=["model.options.dropout=0.3"])
    cfg = other.trial_job(other.trials()[0])
    assert cfg.model.name == "expert_cnn" and cfg.model.options.width == 1.5 and cfg.model.options.dropout == 0.1
    with pytest.raises(ConfigError, match="no_such_option"):
        make_spec(str(job), grid=["model.options.no_such_option=1,2"])
    with pytest.raises(ValueError, match="seeds"):
        make_spec(str(job), seeds=0)


def test_concurrency_follows_the_resources():
    assert max_concurrent_trials(3, 1) == 2  # embedded Ray on 2 cores: 2 + 1 CPUs, 1-worker trials
    assert max_concurrent_trials(3, 2) == 1
    assert max_concurrent_trials(16, 2) == 7 and max_concurrent_trials(16, 2, 3) == 3
    assert max_concurrent_trials(64, 1, gpus=4, per_trial_gpus=2) == 2
    assert max_concurrent_trials(1, 4) == 1  # never zero


def _fake_sweep(tmp_path: Path) -> Path:
    """A finished sweep's table: static baseline, two routed variants with 2 seeds, one with exit curves."""
    sweep = tmp_path / "fake"
    rows = []
    for variant, macs, acc, static, params, curve in (("static", 1.0e6, 0.80, True, 10_000, False),
                                                      ("routed", 1.1e6, 0.84, False, 40_000, False),
                                                      ("exit", 1.6e6, 0.86, False, 60_000, True)):
        for seed in (0, 1):
            path = None
            if curve:
                path = sweep / f"curve{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({
                    "full": {"accuracy": 0.86, "macs_per_sample": 1.6e6}, "light": {"accuracy": 0.70,
                                                                                     "macs_per_sample": 0.4e6},
                    "curve": [{"threshold": t, "accuracy": 0.70 + 0.16 * t, "exit_rate": 1 - t,
                               "macs_per_sample": 0.4e6 + 1.2e6 * t} for t in (0.0, 0.5, 0.9, 0.95, 1.0)]}))
            rows.append({"sweep": "fake", "trial": f"{variant}-{seed}", "variant": variant, "seed": seed,
                         "model": "m", "accuracy": acc + 0.01 * seed, "macs_per_sample": macs, "exit_rate": 0.0,
                         "params": params, "wall_s": 10.0, "images_per_s": 100.0, "static": static,
                         "routing_diversity": None if static else 0.2 + 0.1 * seed,
                         "exit_curve": None if path is None else str(path)})
    write_table(sweep, rows)
    return sweep


def test_report_table_and_plots(tmp_path):
    import matplotlib.image as mpimg

    sweep = _fake_sweep(tmp_path)
    variants = {v["label"]: v for v in summarize(read_table(sweep))}
    assert variants["routed"]["accuracy_mean"] == pytest.approx(0.845)
    assert variants["routed"]["accuracy_std"] == pytest.approx(0.0070710678)  # sample std of 0.84, 0.85
    assert variants["static"]["static"] and variants["static"]["routing_diversity_mean"] is None
    assert pareto_front([(1.0, 0.8), (1.1, 0.84), (1.6, 0.86), (1.2, 0.83)]) == [0, 1, 2]
    assert main(["sweep", "report", str(sweep), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "| static (static) | 2 | 80.50 ± 0.71 |" in md and "| routed | 2 | 84.50 ± 0.71 |" in md
    # the exit curve read the papers' way: the light stage alone, the cheapest point within 0.3 / 1 point
    assert "| exit | 86.00%, 1.600M | 70.00%, 0.400M (0.25x) | t=1: 86.00%, 1.600M (1.00x), exit 0.00 " \
           "| t=0.95: 85.20%, 1.540M (0.96x), exit 0.05 |" in md
    for name in ("accuracy_vs_madds.png", "params_vs_accuracy.png", "diversity.png"):
        img = mpimg.imread(tmp_path / "rep" / name)
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05, f"{name} is blank"
    assert main(["sweep", "report"]) == 2
    assert main(["sweep", "report", str(tmp_path / "nope")]) == 2


# --- real sweeps --------------------------------------------------------------------------------------

@pytest.fixture
def ray_tmp():
    """A Ray temp dir of our own (short: unix socket paths), so no other Ray on this machine is found,
    and every process left holding it is ended afterwards (by pid)."""
    tmp = tempfile.mkdtemp(prefix="cmsw", dir="/tmp")
    try:
        yield tmp
    finally:
        _kill_holding(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_holding(text: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _sweep_cmd(job: Path, *args: str) -> list[str]:
    return [str(BIN / "condmoe"), "sweep", str(job), *args]


def _env(ray_tmp: str) -> dict[str, str]:
    return {**os.environ, "RAY_TMPDIR": ray_tmp, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few Ray Train jobs: minutes each on a busy 2-core machine
def test_grid_with_seeds_on_embedded_ray(tmp_path, fmnist_shards, ray_tmp):
    job = _job(tmp_path / "basis.yaml", fmnist_shards, tmp_path / "runs", model="basisnet_cnn")
    cmd = _sweep_cmd(job, "--grid", "model.experts=2,3", "--seeds", "2", "--name", "grid",
                     "--exit-thresholds", "0,0.5,1.01", "--json")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=_env(ray_tmp))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout)
    assert len(res["ran"]) == 4 and not res["skipped"] and not res["failed"] and res["max_concurrent"] >= 1
    rows = read_table(res["sweep_dir"])
    assert sorted((r["model.experts"], r["seed"]) for r in rows) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert len({r["run_dir"] for r in rows}) == 4
    for r in rows:
        run = Path(r["run_dir"])
        assert run.parent == tmp_path.resolve() / "runs" / "grid" / "runs" and run.name == f"grid-{r['trial']}"
        assert Path(r["checkpoint"]).parent == run / "checkpoints" and r["steps"] == 4
        meta = json.loads((Path(r["checkpoint"]) / "meta.json").read_text())
        assert yaml.safe_load(meta["config"])["cluster"]["name"] == run.name  # = its Prometheus job label
        assert r["eval_samples"] == 768 and 0 <= r["accuracy"] <= 1 and r["macs_per_sample"] > 0
        assert r["params"] > 0 and r["wall_s"] > 0 and r["images_per_s"] > 0
        assert r["routing_diversity"] is not None and not r["static"]
        curve = json.loads(Path(r["exit_curve"]).read_text())
        assert [c["threshold"] for c in curve["curve"]] == [0.0, 0.5, 1.01]
        assert curve["curve"][-1]["accuracy"] == pytest.approx(r["full_accuracy"])
    # nothing left to do: a second start skips every trial
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(ray_tmp)).stdout)
    assert again["ran"] == [] and len(again["skipped"]) == 4
    assert main(["sweep", "report", res["sweep_dir"]]) == 0
    report = Path(res["sweep_dir"]) / "report"
    assert {"accuracy_vs_madds.png", "params_vs_accuracy.png", "diversity.png", "summary.md"} <= \
        {p.name for p in report.iterdir()}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few Ray Train jobs: minutes each on a busy 2-core machine
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, fmnist_shards, ray_tmp):
    job = _job(tmp_path / "cc.yaml", fmnist_shards, tmp_path / "runs", steps=100, every=5)
    cmd = _sweep_cmd(job, "--grid", "model.experts=1,2", "--name", "kill", "--max-concurrent", "1", "--json")
    sweep = tmp_path / "runs" / "kill"
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: nobody reads while it runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(ray_tmp), start_new_session=True)
    try:
        deadline = time.monotonic() + 1800
        # wait for: the first trial finished, the second one past a checkpoint
        while time.monotonic() < deadline:
            done = done_rows(sweep)
            second = [p for p in (sweep / "runs").glob("kill-experts2-*/checkpoints/step-*")] \
                if (sweep / "runs").is_dir() else []
            if len(done) == 1 and second:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the sweep did not get to the second trial's first checkpoint in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep: driver, embedded Ray, trials, workers
        proc.wait()
        log.close()
        _kill_holding(ray_tmp)
    (first_id, first_row), = done_rows(sweep).items()
    marker = sweep / "trials" / f"{first_id}.json"
    stamp = marker.stat().st_mtime_ns
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_env(ray_tmp))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout)
    assert res["skipped"] == [first_id] and len(res["ran"]) == 1 and not res["failed"]
    assert marker.stat().st_mtime_ns == stamp  # the finished trial was not run again
    rows = read_table(sweep)
    assert len(rows) == 2 and all(r["steps"] == 100 for r in rows)
    resumed = [json.loads(x) for x in (Path(rows[1]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in resumed if r["kind"] == "restart"]
    assert restarts[0]["resumed_from"] is None and restarts[-1]["resumed_from"] is not None  # from its checkpoint


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few Ray Train jobs: minutes each on a busy 2-core machine
def test_sweep_submitted_to_a_head_node(ray_head, tmp_path, fmnist_shards, monkeypatch, capsys):  # noqa: F811
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    job = _job(tmp_path / "cc.yaml", fmnist_shards, tmp_path / "runs")
    rc = main(["sweep", str(job), "--grid", "model.experts=1,2", "--name", "onhead", "--submit",
               "--address", url, "--wait", "--timeout", "1200"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "SUCCEEDED" in out
    rows = read_table(tmp_path / "runs" / "onhead")
    assert sorted(r["model.experts"] for r in rows) == [1, 2]
    assert all(r["accuracy"] is not None and Path(r["checkpoint"]).is_dir() for r in rows)
    assert [r["static"] for r in sorted(rows, key=lambda r: r["model.experts"])] == [True, False]
