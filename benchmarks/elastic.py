"""Node loss: time from losing a node to the next training step, elastic vs waiting for a replacement.

A Ray cluster of two nodes on this host (condmoe.cluster.local_cluster: a head
and a second ``ray start`` node, one ``trainer`` resource each, so the 2-worker
job puts one worker per node) runs a topk_moe job (``configs/topk_moe.yaml``,
``--size``) that checkpoints every ``--every`` steps. Once it trained past its
first checkpoint the second node is killed (SIGKILL to its raylet, agents and
workers). Then, per scenario:

- elastic: ``cluster.workers: [1, 2]``; nothing is done; the job goes on with
  one worker from the newest checkpoint. After the measurement the node is
  started again and the time until the job trains on 2 workers again is taken too;
- fixed: ``cluster.workers: 2``; a replacement node is started ``--delay``
  seconds after the loss (what an autoscaler or an operator does).

Measured from the kill (wall clock, the key log's step times): the first step of
the next worker group, and the restart record (worker group up, checkpoint
loaded); steps lost = last step trained before the loss - the checkpoint resumed
from. Ray's node health checks run at their defaults unless ``--fast-health``.

Also: the cost of the per-step stop check (condmoe.trainer.stop.agree, a
1-element all-reduce) on 2 gloo processes, against the job's median step time.

Prints a table and writes benchmarks/results/elastic.json.

    python benchmarks/elastic.py [--delay 20 --size tiny --every 2 --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from condmoe.cluster.local_cluster import LocalCluster
from condmoe.trainer.records import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONDMOE = Path(sys.executable).parent / "condmoe"
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_initial_delay_ms": "1000"}


def _shards(path: Path) -> Path:
    from condmoe.datasets import write_shards

    if (path / "manifest.parquet").is_file():
        return path
    return write_shards("fashion_mnist", path, samples_per_shard=128, limit=2048)


def _lines(run: Path) -> list[dict]:
    keys = run / "keys"
    if not keys.is_dir():
        return []
    return [json.loads(x) for f in sorted(keys.glob("rank*.jsonl")) for x in f.read_text().splitlines() if x.strip()]


def _wait(cond, proc: subprocess.Popen, timeout: float, what: str, out: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended while waiting for {what}:\n{out.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s:\n{out.read_text()[-3000:]}")


def scenario(args, shards: Path, tmp: Path, name: str) -> dict:
    elastic = name == "elastic"
    env = FAST_HEALTH if args.fast_health else {}
    with LocalCluster(cpus_per_node=2, env=env) as cl:
        cl.start_head({"trainer": 1})
        cl.add_node("node2", {"trainer": 1})
        run = tmp / "runs" / name
        out = tmp / f"{name}.out"
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = [str(CONDMOE), "train", str(ROOT / "configs" / "topk_moe.yaml"), "--address", cl.address,
               *[a for o in (f"data.path={shards}", f"model.size={args.size}", f"data.batch_size={args.batch}",
                             "optim.steps=100000", "optim.warmup_steps=2", f"checkpoint.every={args.every}",
                             "metrics.log_every=1", "metrics.eval_every=0", "metrics.record_keys=true",
                             "metrics.prometheus.port=0", f"cluster.storage_path={tmp / 'runs'}",
                             f"cluster.name={name}", "cluster.resources_per_worker={trainer: 1}",
                             f"cluster.workers={'[1, 2]' if elastic else 2}", "cluster.max_failures=-1",
                             f"cluster.start_timeout_s={args.start_timeout}",
                             f"cluster.resize_interval_s={args.resize_interval}")
                 for a in ("--set", o)]]
        penv = {**os.environ, "DS_ACCELERATOR": "cpu", **cl.client_env}
        penv.pop("RAY_ADDRESS", None)
        with open(out, "w") as f:
            proc = subprocess.Popen(cmd, env=penv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            first_ckpt = args.every * 2
            _wait(lambda: max((x["step"] for x in _lines(run)), default=0) >= first_ckpt + 1, proc, args.timeout,
                  f"step {first_ckpt + 1}", out)
            pids = {x["pid"] for x in _lines(run)}
            t_kill = cl.kill_node("node2")
            last = max(x["step"] for x in _lines(run) if x["time"] <= t_kill)
            if not elastic:
                time.sleep(max(0.0, t_kill + args.delay - time.time()))
                t_node = time.time()
                cl.add_node("node2", {"trainer": 1})
                node_up = time.time() - t_node
            nxt = _wait(lambda: next((x for x in _lines(run) if x["pid"] not in pids), None), proc, args.timeout,
                        "a step of the next worker group", out)
            restart = [r for r in read_jsonl(run / "metrics.jsonl", "restart") if r["time"] > t_kill][0]
            res = {"scenario": name, "next_step_s": nxt["time"] - t_kill, "restart_record_s": restart["time"] - t_kill,
                   "workers_after": nxt["world"], "last_step_before": last, "resumed_at": restart["step"],
                   "steps_lost": last - restart["step"]}
            if elastic:  # capacity back: how long until 2 workers train again
                t_back = time.time()
                cl.add_node("node2", {"trainer": 1})
                two = _wait(lambda: next((x for x in _lines(run) if x["world"] == 2 and x["time"] > t_back), None),
                            proc, args.timeout, "a step on 2 workers again", out)
                res["grow_back_s"] = two["time"] - t_back
            else:
                res["replacement_delay_s"] = args.delay
                res["replacement_node_start_s"] = node_up
            return res
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # condmoe train stops with a checkpoint and cleans up
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _agree_worker(rank: int, port: int, n: int, out) -> None:
    import torch.distributed as dist

    from condmoe.trainer.stop import agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for _ in range(50):
        agree(0)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        agree(0)
    out.put((rank, (time.perf_counter() - t0) / n))
    dist.destroy_process_group()


def stop_check_cost(n: int = 2000) -> float:
    """Seconds per ``agree()`` (1-element MAX all-reduce) between 2 gloo processes on this host."""
    import multiprocessing as mp

    from condmoe.trainer.engine import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, n, q)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    times = [q.get(timeout=300)[1] for _ in procs]
    for proc in procs:
        proc.join()
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=20.0, help="fixed: the replacement node starts this late")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--start-timeout", type=float, default=15.0, help="cluster.start_timeout_s")
    ap.add_argument("--resize-interval", type=float, default=5.0, help="cluster.resize_interval_s")
    ap.add_argument("--fast-health", action="store_true", help="Ray node health checks every 1 s (default: Ray's)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds any wait may take")
    ap.add_argument("--shards", type=Path, default=Path(tempfile.gettempdir()) / "condmoe-bench-elastic-shards")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "elastic.json")
    args = ap.parse_args()
    shards = _shards(args.shards)
    agree_s = stop_check_cost()
    print(f"stop check (1-element all-reduce, 2 gloo ranks): {agree_s * 1e6:.0f} us per step", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="condmoe-elastic-") as d:
        step_times = []
        for r in range(args.repeats):
            for name in ("elastic", "fixed"):
                res = scenario(args, shards, Path(d) / f"r{r}", name)
                print(f"round {r + 1}: {json.dumps(res)}", flush=True)
                results.append(res)
                step_times += [s for x in read_jsonl(Path(d) / f"r{r}" / "runs" / name / "metrics.jsonl", "step")
                               if x.get("step", 0) > 2 for s in [x["samples"] / max(x["samples_per_s"], 1e-9)]]
    print(f"\nnode lost at step > {args.every * 2} (checkpoint every {args.every}), topk_moe/{args.size}, "
          f"batch {args.batch}; fixed: replacement node started {args.delay:.0f} s after the loss; "
          f"Ray health checks {'1 s' if args.fast_health else 'default'}")
    print(f"{'scenario':<10} {'workers':>7} {'loss->next step':>16} {'loss->restart':>14} {'steps lost':>10} "
          f"{'grow back':>10}")
    summary = {}
    for name in ("elastic", "fixed"):
        rs = [x for x in results if x["scenario"] == name]
        med = {k: statistics.median(x[k] for x in rs) for k in ("next_step_s", "restart_record_s", "steps_lost")}
        grow = statistics.median(x["grow_back_s"] for x in rs) if name == "elastic" else None
        summary[name] = {**med, "grow_back_s": grow, "workers_after": rs[0]["workers_after"], "runs": len(rs)}
        print(f"{name:<10} {rs[0]['workers_after']:>7} {med['next_step_s']:>15.1f}s {med['restart_record_s']:>13.1f}s "
              f"{med['steps_lost']:>10.0f} {('%.1fs' % grow) if grow is not None else '-':>10}")
    step_s = statistics.median(step_times) if step_times else float("nan")
    print(f"stop check: {agree_s * 1e6:.0f} us per step = {agree_s / step_s:.2%} of the median step "
          f"({step_s * 1e3:.0f} ms, rank 0, log intervals of the runs above)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                    "summary": summary, "stop_check_s": agree_s, "median_step_s": step_s},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
