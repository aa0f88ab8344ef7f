"""DeepSpeed's JIT ops load even when a killed process left torch's build lock file behind
(trainer/ds_ops.py): before, every later DeepSpeed process waited for that file forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from condmoe.trainer.ds_ops import clear_stale_lock


def test_a_lock_file_nobody_holds_is_removed(tmp_path):
    assert not clear_stale_lock(tmp_path)  # no lock file
    (tmp_path / "lock").touch()
    assert clear_stale_lock(tmp_path) and not (tmp_path / "lock").exists()


def test_a_lock_file_a_live_process_holds_stays(tmp_path):
    """A process that is building (it keeps the lock file open, as torch's FileBaton does) keeps it."""
    lock = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
                               "time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not clear_stale_lock(tmp_path) and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert clear_stale_lock(tmp_path)  # its holder died: now it is stale


def _build_dir(env: dict[str, str]) -> str:
    """torch's build directory of DeepSpeed's shared-memory op, as a fresh process sees it."""
    return subprocess.run([sys.executable, "-c", "from torch.utils.cpp_extension import _get_build_directory as d; "
                           "print(d('deepspeed_shm_comm', False))"], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.multiproc
def test_deepspeed_starts_after_a_process_died_holding_the_build_lock():
    """The real build directory of deepspeed_shm_comm with a lock file left behind (what SIGKILL during
    a load leaves): DeepSpeed's own load waits forever; condmoe's loads the op and starts."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    where = _build_dir(env)
    lock = os.path.join(where, "lock")
    open(lock, "a").close()  # its creator is gone
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "condmoe.trainer.ds_ops"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deepspeed_shm_comm" in res.stdout and "removed a stale DeepSpeed build lock" in res.stderr
    assert not os.path.exists(lock), f"still there after {time.monotonic() - t0:.0f} s"


@pytest.mark.multiproc
def test_the_op_is_not_rebuilt_for_another_ninja_on_path(tmp_path):
    """Loads from processes whose PATH finds different ninjas first (the venv's, or the system's when
    there is one) build once at most: every load runs the ninja package's binary, so the build log's
    command hashes stay those of one ninja version (two versions hash differently, and each took the
    other's build for a changed command: a minute's rebuild per switch)."""
    import ninja

    venv_bin = os.path.dirname(sys.executable)
    paths = [os.pathsep.join([venv_bin, "/usr/bin", "/bin"]), os.pathsep.join(["/usr/bin", "/bin"])]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    where = _build_dir(env)
    log = os.path.join(where, ".ninja_log")

    def load(path: str) -> None:
        res = subprocess.run([sys.executable, "-m", "condmoe.trainer.ds_ops"], env={**env, "PATH": path},
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    load(paths[0])  # built (if it was not) by the pinned ninja
    before = open(log).read()
    for path in (*paths[::-1], *paths):
        load(path)
    assert open(log).read() == before, "a load rebuilt the op"
    assert os.path.isfile(os.path.join(ninja.BIN_DIR, "ninja"))
