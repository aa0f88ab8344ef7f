"""``condmoe shards write|verify|inspect`` through the real CLI entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from condmoe.cluster.cli import main
from condmoe.datasets import read_manifest


def test_write_verify_inspect(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["shards", "write", "--source", "synthetic:n=200,size=8,channels=1,classes=5", "--out", str(out),
               "--samples-per-shard", "40", "--no-progress"])
    assert rc == 0 and "wrote 200 samples" in capsys.readouterr().out
    assert [r.samples for r in read_manifest(out).split("train")] == [40, 40, 40, 20]

    assert main(["shards", "verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("OK: checked 6 shards, 200 samples")

    assert main(["shards", "inspect", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("train", "val", "test", "class0=", "synthetic:n=200"):
        assert word in table

    damaged = out / "train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])
    (out / "val-000000.tar").unlink()
    assert main(["shards", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "BAD train-000002.tar: size 3000 bytes" in text and "BAD val-000000.tar: missing" in text
    assert "2 bad shard(s)" in text


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["shards", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.parquet" in err
    assert main(["shards", "write", "--source", "nope", "--out", str(tmp_path / "x"), "--samples-per-shard", "5"]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_console_script(tmp_path):
    exe = Path(sys.executable).parent / "condmoe"
    env = {**os.environ, "COLUMNS": "200"}
    out = tmp_path / "d"
    res = subprocess.run([str(exe), "shards", "write", "--source", "digits", "--out", str(out), "--samples-per-shard",
                          "500", "--limit", "100"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe), "shards", "verify", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK: checked 3 shards, 100 samples" in res.stdout
