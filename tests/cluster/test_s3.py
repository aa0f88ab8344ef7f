"""Object storage with a real S3-compatible server: moto's standalone server (the dev extra) on 127.0.0.1.

Shards written to S3 read back identically (keys, bytes, pixels, an exact resume); a half-uploaded set
is never read as complete; a rank killed while it uploads a checkpoint leaves the previous one the
latest and a resume (same and another world size) works from it, keep-last-K pruning included; a
2-worker Ray job trains from S3 shards with its checkpoints and Ray Train's run state on S3, and a
second run resumes the step count and the data position; a bad bucket, endpoint or credentials fail
in one line naming the URL before Ray starts. The AWS variables are set for the subprocesses only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.importorskip("moto", reason="moto[server] (the dev extra) provides the local S3 server")

from condmoe.trainer.engine import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONDMOE = Path(sys.executable).parent / "condmoe"
WORKER = Path(__file__).resolve().parent / "_s3_ckpt_worker.py"
KEY_ID, SECRET = "condmoe-test-key", "condmoe-test-secret-7f3a9c"  # the secret must appear in nothing written


def _start_moto(log: Path, extra_env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(extra_env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError("moto server did not listen within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class S3:
    """The test server: ``env`` for subprocesses, and a filesystem with explicit options for the test's
    own checks (so this process's environment stays free of AWS variables)."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint.split("://")[1], scheme="http",
                                 region="us-east-1", access_key=KEY_ID, secret_key=SECRET,
                                 allow_bucket_creation=True)

    def bucket(self, name: str) -> str:
        self.fs().create_dir(name)
        return f"s3://{name}"

    def files(self, url: str) -> dict[str, int]:
        """Object name (relative to ``url``) -> size, recursively."""
        import pyarrow.fs as pafs

        base = url.split("://")[1].rstrip("/")
        infos = self.fs().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, url: str) -> bytes:
        with self.fs().open_input_file(url.split("://")[1]) as f:
            return f.read()

    def python(self, code: str, *, env: dict | None = None, timeout: float = 300) -> dict:
        """Run ``code`` in a subprocess with the AWS variables; it prints one JSON line last."""
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env or self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free 127.0.0.1 port for the session; stopped afterwards."""
    proc, port = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield S3(f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


def test_shards_on_s3_read_back_identically(s3, tmp_path):
    url = f"{s3.bucket('shards')}/fmnist"
    res = s3.python(f"""
        import json, torch
        from condmoe.datasets import StreamingLoader, write_shards
        write_shards("fashion_mnist", {str(tmp_path / 'fmnist')!r}, samples_per_shard=128, limit=384)
        write_shards("fashion_mnist", {url!r}, samples_per_shard=128, limit=384)
        out = {{}}
        for split in ("train", "test"):
            a, b = (StreamingLoader(src, split, 32, seed=3) for src in ({str(tmp_path / 'fmnist')!r}, {url!r}))
            ba, bb = list(a), list(b)
            out[split] = {{"keys": [k for x in ba for k in x.keys] == [k for x in bb for k in x.keys],
                          "pixels": all(torch.equal(x.images, y.images) for x, y in zip(ba, bb)), "n": len(bb)}}
        # the exact-resume reader on S3: a state after 3 batches continues with the rest, 2 loader workers
        c = StreamingLoader({url!r}, "train", 32, seed=3)
        it = iter(c)
        first = [k for _ in range(3) for k in next(it).keys]
        d = StreamingLoader({url!r}, "train", 32, seed=3, num_workers=2)
        d.load_state_dict(c.state_dict())
        rest = [k for x in d for k in x.keys]
        out["resume"] = first + rest == [k for x in StreamingLoader({url!r}, "train", 32, seed=3) for k in x.keys]
        print(json.dumps(out))
    """)
    assert res["train"] == {"keys": True, "pixels": True, "n": res["train"]["n"]} and res["train"]["n"] > 5
    assert res["test"]["keys"] and res["test"]["pixels"] and res["resume"]
    local = {p.name: p.read_bytes() for p in (tmp_path / "fmnist").iterdir()}
    remote = s3.files(url)
    assert sorted(remote) == sorted(local)  # the same objects, byte for byte (fixed mtimes: same tars)
    assert all(s3.read(f"{url}/{name}") == body for name, body in local.items())


def test_half_uploaded_shard_set_is_never_complete(s3):
    url = f"{s3.bucket('halfset')}/fmnist"
    res = s3.python(f"""
        import json, pyarrow.fs
        from condmoe.datasets import StreamingLoader, read_manifest, write_shards
        write_shards("fashion_mnist", {url!r}, samples_per_shard=64, limit=128)  # a complete set
        before = len(read_manifest({url!r}).shards)
        real = pyarrow.fs.copy_files
        def crash(*a, **k):  # every shard uploaded, killed before the manifest
            real(*a, **k)
            raise KeyboardInterrupt("killed mid-upload")
        pyarrow.fs.copy_files = crash
        try:
            write_shards("fashion_mnist", {url!r}, samples_per_shard=32, limit=128, overwrite=True)
        except KeyboardInterrupt:
            pass
        pyarrow.fs.copy_files = real
        errors = []
        for read in (lambda: read_manifest({url!r}), lambda: StreamingLoader({url!r}, "train", 8)):
            try:
                read()
            except FileNotFoundError as e:
                errors.append(str(e))
        try:
            write_shards("fashion_mnist", {url!r}, samples_per_shard=32, limit=128)
        except ValueError as e:
            errors.append(str(e))
        write_shards("fashion_mnist", {url!r}, samples_per_shard=32, limit=128, overwrite=True)
        print(json.dumps({{"before": before, "errors": errors, "after": len(read_manifest({url!r}).shards)}}))
    """)
    assert len(res["errors"]) == 3, res
    assert "no manifest.parquet" in res["errors"][0] and "no manifest.parquet" in res["errors"][1]
    assert "not empty" in res["errors"][2] and url in res["errors"][2]
    assert res["after"] > res["before"]  # the rewrite with smaller shards is complete


@pytest.mark.slow
@pytest.mark.multiproc
def test_kill_during_upload_keeps_previous_checkpoint(s3, tmp_path):
    root = f"{s3.bucket('ckpts')}/run"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"name": "test_soft_cnn", "size": "tiny", "experts": 4},
        "data": {"path": str(tmp_path), "batch_size": 32},
        "checkpoint": {"dir": f"{root}/checkpoints"}, "cluster": {"storage_path": str(tmp_path / "runs")}}))
    out = tmp_path / "out.json"

    def start(world: int, mode: str) -> list[subprocess.Popen]:
        port = str(free_port())
        return [subprocess.Popen([sys.executable, str(WORKER), str(job), mode, str(out)],
                                 env={**s3.env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                      "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                      "MASTER_PORT": port, "CONDMOE_STAGE_DIR": str(tmp_path / f"stage{r}")},
                                 stdout=open(tmp_path / f"{mode}-{world}-rank{r}.log", "w"),
                                 stderr=subprocess.STDOUT)
                for r in range(world)]

    def logs(mode: str, world: int) -> str:
        return "\n".join((tmp_path / f"{mode}-{world}-rank{r}.log").read_text()[-3000:] for r in range(world))

    def end(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    procs = start(2, "save-then-hang")
    try:
        deadline = time.monotonic() + 900  # a loaded 2-core machine: DeepSpeed's start takes minutes
        while not out.with_suffix(".uploading").exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                end(procs)
                pytest.fail(f"rank 1 never reached its upload:\n{logs('save-then-hang', 2)}")
            time.sleep(0.2)
        os.kill(int(out.with_suffix(".uploading").read_text()), signal.SIGKILL)  # rank 1, mid-upload
        time.sleep(2)
    finally:
        end(procs)
    files = s3.files(f"{root}/checkpoints")
    assert "step-00000001/meta.json" in files
    assert any(f.startswith("step-00000002/") for f in files), files  # some of step 2 was uploaded ...
    assert "step-00000002/meta.json" not in files  # ... but never committed
    res = s3.python(f"""
        import json
        from condmoe.trainer.checkpoint import latest_checkpoint, list_checkpoints, resolve_checkpoint
        print(json.dumps({{"list": list_checkpoints({root + '/checkpoints'!r}),
                          "latest": latest_checkpoint({root + '/checkpoints'!r}),
                          "resolved": resolve_checkpoint({root!r})}}))
    """)
    assert res == {"list": [f"{root}/checkpoints/step-00000001"], "latest": f"{root}/checkpoints/step-00000001",
                   "resolved": f"{root}/checkpoints/step-00000001"}
    for world in (2, 1):  # DeepSpeed's own sharded load, then the portable state re-sharded onto one rank
        procs = start(world, "resume")
        try:
            for p in procs:
                p.wait(timeout=900)
        finally:
            end(procs)
        assert all(p.returncode == 0 for p in procs), logs("resume", world)
        res = json.loads(out.read_text())
        assert res["same_weights"] and res["saved_world"] == 2 and res["world"] == world
        if world == 2:
            assert res["latest"] == f"{root}/checkpoints/step-00000001" and res["step"] == 1
            # keep_last=2 after steps 3 and 4: step 1 pruned, the uncommitted step 2 deleted
            assert res["listed"] == [f"{root}/checkpoints/step-00000003", f"{root}/checkpoints/step-00000004"]
            assert not any(f.startswith(("step-00000001/", "step-00000002/"))
                           for f in s3.files(f"{root}/checkpoints"))
        else:  # step 4 holds step 1's weights (saved right after loading them)
            assert res["latest"] == f"{root}/checkpoints/step-00000004" and res["step"] == 4
    # downloads and uploads leave nothing staged (the killed rank's step 2 went with rank 1's next save)
    staged = sorted(p.name for r in (0, 1) for p in (tmp_path / f"stage{r}").glob("*/*"))
    assert staged == [], staged


JOB = ROOT / "configs" / "topk_moe.yaml"  # hard routing, ep 2: each rank writes its own expert files


def _train(s3: S3, overrides: list[str], timeout: float = 600) -> tuple[dict, str]:
    cmd = [str(CONDMOE), "train", str(JOB), "--json"] + [a for o in overrides for a in ("--set", o)]
    p = subprocess.run(cmd, env=s3.env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_trains_from_s3_checkpoints_there_and_resumes(s3, tmp_path):
    bucket = s3.bucket("job")
    data, storage = f"{bucket}/fmnist", f"{bucket}/runs"
    run = f"{storage}/topk_moe"
    expected = s3.python(f"""
        import json
        from condmoe.datasets import StreamingLoader, write_shards
        write_shards("fashion_mnist", {data!r}, samples_per_shard=128, limit=768)
        keys = {{}}  # the reader's order: (rank, step) -> keys of its 16-sample micro batch
        for rank in (0, 1):
            it = iter(StreamingLoader({data!r}, "train", 16, rank=rank, world_size=2, seed=0))
            for step in range(1, 13):
                keys[f"{{rank}}:{{step}}"] = next(it).keys
        print(json.dumps(keys))
    """)
    common = [f"data.path={data}", f"cluster.storage_path={storage}", f"storage.local_dir={tmp_path / 'logs'}",
              "model.size=tiny", "data.batch_size=32", "optim.schedule=constant", "optim.warmup_steps=0",
              "checkpoint.every=3", "checkpoint.keep_last=2", "metrics.log_every=1", "metrics.eval_batches=1",
              "metrics.record_keys=true", "metrics.prometheus.enabled=false"]
    res, _ = _train(s3, [*common, "optim.steps=6"])
    assert res["metrics"]["step"] == 6
    assert res["checkpoint"] == f"{run}/checkpoints/step-00000006"  # Ray Train's own record of it
    files = s3.files(run)
    assert {"checkpoints/step-00000003/meta.json", "checkpoints/step-00000006/meta.json",
            "logs/metrics.jsonl"} <= set(files)
    assert any("checkpoint_manager_snapshot" in f for f in files), sorted(files)  # Ray Train's run state
    res, _ = _train(s3, [*common, "optim.steps=12"])  # the same run name: it resumes at step 6
    assert res["metrics"]["step"] == 12
    files = s3.files(run)
    assert sorted(f.split("/")[1] for f in files if f.endswith("/meta.json")) == ["step-00000009", "step-00000012"]
    metrics = [json.loads(x) for x in s3.read(f"{run}/logs/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "restart" and m.get("rank", 0) == 0] in ([0, 6], [6]), metrics
    # the data position continued exactly: every rank's keys of steps 1-12 are the reader's order, once
    got = {}
    for rank in (0, 1):
        for line in s3.read(f"{run}/logs/keys/rank{rank}.jsonl").decode().splitlines():
            rec = json.loads(line)
            assert f"{rank}:{rec['step']}" not in got, f"step {rec['step']} trained twice on rank {rank}"
            got[f"{rank}:{rec['step']}"] = rec["keys"]
    assert got == expected
    # credentials are in nothing written: checkpoints' meta.json, logs, Ray Train's state
    for name in files:
        if name.endswith((".json", ".jsonl", ".yaml", ".parquet", ".pkl")) or "snapshot" in name:
            assert SECRET.encode() not in s3.read(f"{run}/{name}"), name
    for f in (tmp_path / "logs").rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f


def test_bad_s3_config_fails_in_one_line_before_ray(s3, fmnist_shards, tmp_path):
    s3.bucket("exists")
    base = [str(CONDMOE), "train", str(JOB), "--set", f"data.path={fmnist_shards}", "--set", "model.size=tiny"]
    p = subprocess.run([*base, "--set", "cluster.storage_path=s3://no-such-bucket/runs"], env=s3.env,
                       capture_output=True, text=True, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last == ("condmoe train: error: s3://no-such-bucket/runs/topk_moe: bucket "
                                          "'no-such-bucket' does not exist"), p.stderr[-3000:]
    assert "Ray" not in p.stderr  # nothing started
    # an authenticating server: no credentials, unknown credentials; a port nothing listens on
    proc, port = _start_moto(tmp_path / "moto-auth.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        auth, closed = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"
        cases = {"none": {"AWS_ENDPOINT_URL": auth, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
                 "unknown": {"AWS_ENDPOINT_URL": auth},
                 "unreachable": {"AWS_ENDPOINT_URL": closed}}
        res = s3.python(f"""
            import json, os
            from condmoe.cluster.launch import check_data, check_storage
            from condmoe.trainer.config import load_job
            from condmoe.trainer.storage import StorageError
            cfg = load_job({str(JOB)!r}, ["cluster.storage_path=s3://exists/runs", "data.path=s3://exists/none"])
            out = {{}}
            for name, env in {cases!r}.items():
                saved = dict(os.environ)
                os.environ.update(env)
                for k in [k for k, v in env.items() if not v]:
                    del os.environ[k]
                try:
                    check_storage(cfg)
                    out[name] = "ok"
                except StorageError as e:
                    out[name] = str(e)
                os.environ.clear()
                os.environ.update(saved)
            try:
                check_data(cfg)
            except FileNotFoundError as e:
                out["data"] = str(e)
            print(json.dumps(out))
        """, env={**s3.env, "HOME": str(tmp_path)})  # no ~/.aws/credentials of this machine's user
    finally:
        _stop(proc)
    url = "s3://exists/runs/topk_moe"
    assert res["none"].startswith(f"{url}: no AWS credentials found"), res
    assert res["unknown"] == f"{url}: access denied with the credentials of AWS_ACCESS_KEY_ID", res
    assert res["unreachable"].startswith(f"{url}: endpoint {closed} unreachable"), res
    assert res["data"].startswith("data.path 's3://exists/none' holds no manifest.parquet"), res
    assert all("\n" not in v and SECRET not in v for v in res.values())


def test_storage_section_and_paths():
    from condmoe.trainer.config import ConfigError, job_from_dict, resolve_paths

    tree = {"model": {"name": "condconv_cnn"}, "data": {"path": "s3://b/fmnist"},
            "cluster": {"storage_path": "s3://b/runs/", "name": "r"},
            "storage": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "local_dir": "logs"}}
    cfg = resolve_paths(job_from_dict(tree))
    assert cfg.data.path == "s3://b/fmnist" and cfg.run_url == "s3://b/runs/r"
    assert cfg.checkpoint_dir == "s3://b/runs/r/checkpoints"
    assert cfg.run_dir == Path.cwd() / "logs" / "r"  # the logs stay local
    assert cfg.storage.env() == {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                 "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    with pytest.raises(ConfigError, match="credentials never go in a job file") as err:
        job_from_dict({**tree, "storage": {"secret_key": "hunter2"}})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="endpoint_url must start with http"):
        job_from_dict({**tree, "storage": {"endpoint_url": "127.0.0.1:9000"}})
    local = resolve_paths(job_from_dict({**tree, "cluster": {"storage_path": "runs", "name": "r"}}))
    assert local.checkpoint_dir == Path.cwd() / "runs" / "r" / "checkpoints" and local.run_url == str(local.run_dir)
