"""The CLI's shared pieces: one-line errors, --json's clean stdout, shipped jobs, `shards write` syntax, -v."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from condmoe.cluster.cli import (SHIPPED_PREFIX, build_parser, fail, main, resolve_job, shipped_jobs,
                                 stdout_to_stderr, worker_log_overrides)
from condmoe.cluster.ray_logs import VERBOSE_ENV


def test_fail_prints_one_line(capsys):
    assert fail("train", "first\n  second line", 1) == 1
    assert capsys.readouterr().err == "condmoe train: error: first second line\n"


def test_stdout_to_stderr_catches_fd_writes(capfd):
    print("before")
    with stdout_to_stderr():
        print("python print")
        sys.stdout.flush()
        os.write(1, b"fd 1 write\n")  # what Ray's forwarded lines, C++ and child processes do
    print('{"json": 1}')
    out, err = capfd.readouterr()
    assert out == 'before\n{"json": 1}\n'
    assert "python print" in err and "fd 1 write" in err


def test_stdout_to_stderr_disabled_is_a_no_op(capfd):
    with stdout_to_stderr(False):
        print("kept")
    assert capfd.readouterr().out == "kept\n"


def test_shipped_jobs_are_the_config_files():
    configs = Path(__file__).resolve().parents[2] / "configs"
    assert set(shipped_jobs()) == {p.stem for p in configs.glob("*.yaml")}
    assert Path(resolve_job(f"{SHIPPED_PREFIX}coe")).read_text() == (configs / "coe.yaml").read_text()
    assert resolve_job("configs/coe.yaml") == "configs/coe.yaml"  # a path stays a path
    with pytest.raises(FileNotFoundError, match="condmoe:condconv"):  # the message lists what exists
        resolve_job("condmoe:nope")


def test_unknown_shipped_job_is_one_line(capsys):
    assert main(["train", "condmoe:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no shipped job 'condmoe:nope'" in err


def test_shards_write_positional_and_flags(tmp_path, capsys):
    src = "synthetic:n=60,size=8,channels=1,classes=3"
    assert main(["shards", "write", src, str(tmp_path / "a"), "--samples-per-shard", "20", "--no-progress"]) == 0
    assert "wrote 60 samples" in capsys.readouterr().out
    # the flag spelling still works, also mixed with one positional
    assert main(["shards", "write", "--source", src, str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["shards", "write", src, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    capsys.readouterr()
    assert build_parser().parse_args(["shards", "write", src, "x"]).samples_per_shard == 2000
    for argv in (["shards", "write", src], ["shards", "write", src, "d", "--out", "e"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("condmoe shards write: error: give SOURCE and OUT")


def test_verbose_before_or_after_the_command():
    parser = build_parser()
    for argv in (["-v", "train", "j.yaml"], ["train", "j.yaml", "-v"], ["shards", "verify", "d", "-v"]):
        assert parser.parse_args(argv).verbose is True
    args = parser.parse_args(["train", "j.yaml"])
    assert args.verbose is False and worker_log_overrides(args) == []
    assert worker_log_overrides(parser.parse_args(["train", "j.yaml", "-v"])) == [f"cluster.env.{VERBOSE_ENV}=1"]


def test_quiet_train_reports_lowers_only_that_logger(monkeypatch):
    import logging

    from ray.train.v2._internal.execution import context

    from condmoe.cluster.ray_logs import quiet_train_reports

    logger = context.logger
    before = logger.level
    try:
        monkeypatch.setenv(VERBOSE_ENV, "1")
        logger.setLevel(logging.NOTSET)
        quiet_train_reports()
        assert logger.level == logging.NOTSET
        monkeypatch.delenv(VERBOSE_ENV)
        quiet_train_reports()
        assert logger.level == logging.WARNING  # warnings and errors still pass
        assert logger.name.endswith("context.py")  # Ray names it after its file: the one report logger
    finally:
        logger.setLevel(before)
