"""DeepSpeed's JIT-compiled C++ ops, loaded so that a killed process cannot block every later one.

DeepSpeed compiles some ops on first use through torch.utils.cpp_extension; on
CPU every ``deepspeed.init_distributed`` loads the shared-memory collective
``deepspeed_shm_comm``. torch guards the op's build directory with a lock FILE
(``FileBaton``: created with O_EXCL, deleted on release) that every loading
process takes, even when the build is up to date (it re-writes build.ninja and
runs ninja). A process killed while it holds the file (a worker lost to
SIGKILL or a node loss, a job stopped during its first, minutes-long compile,
a timeout) leaves it behind, and every later process waits for it forever:
``FileBaton.wait`` polls until the file goes.

:func:`load_ops` loads the ops before DeepSpeed does, under an ``flock`` on a
file beside the build directory (the kernel releases it when its holder dies,
so it can never go stale); while holding it, a lock file that no live process
has open is stale and is removed (with a warning). DeepSpeed keeps loaded ops
per process (``OpBuilder._loaded_ops``), so its own load inside
``init_distributed`` does not touch the lock file again.

The build always runs the ``ninja`` of the ``ninja`` Python package (a DeepSpeed dependency), never
whichever ``ninja`` comes first on PATH: torch runs plain ``ninja``, and two ninja versions hash
the build commands in ``.ninja_log`` differently (1.11 MurmurHash, 1.12+ rapidhash), so each one
takes the other's build for a changed command and rebuilds everything. On a machine with a system
ninja beside the venv's (Debian's 1.11 in /usr/bin), every process started with the other PATH
(an activated venv vs. ``.venv/bin/condmoe``, a Ray worker vs. its driver) spent a minute
recompiling, holding the lock, while every other DeepSpeed process waited.

``python -m condmoe.trainer.ds_ops`` compiles them ahead of time (``make setup``
does, so the first job does not spend its first minutes compiling).
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# DeepSpeed's builders that a condmoe job loads at run time (deepspeed/comm/torch.py:build_shm_op)
JIT_OPS = ("ShareMemCommBuilder",)


def _holders(path: Path) -> list[int]:
    """Pids of the live processes that have ``path`` open (FileBaton keeps its descriptor until release)."""
    target, pids = str(path), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove ``build_dir/lock`` when no live process holds it; returns True if one was removed.

    Call with the directory's flock held (:func:`_build_lock`), so no condmoe process is between
    creating the file and opening it. Without /proc (not Linux) nothing is removed.
    """
    baton = build_dir / "lock"
    if not baton.exists() or not Path("/proc/self/fd").is_dir() or _holders(baton):
        return False
    try:
        baton.unlink()
    except FileNotFoundError:  # released meanwhile by a process outside condmoe
        return False
    log.warning("removed a stale DeepSpeed build lock %s (left by a process killed while loading the op)", baton)
    return True


@contextmanager
def _build_lock(build_dir: Path):
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{build_dir.name}.condmoe-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _pinned_ninja():
    """PATH with the ``ninja`` package's binary first while torch builds (see the module docstring)."""
    try:
        import ninja
    except ImportError:  # not installed: torch finds (and needs) one on PATH
        yield None
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, *([before] if before else [])])
    try:
        yield ninja.BIN_DIR
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def load_ops() -> list[str]:
    """Load (compiling if needed) DeepSpeed's JIT ops for the current accelerator; returns their names.

    Import after trainer/device.py has set ``DS_ACCELERATOR``.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    loaded = []
    for class_name in JIT_OPS:
        builder = get_accelerator().create_op_builder(class_name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        if builder.name in type(builder)._loaded_ops:
            loaded.append(builder.name)
            continue
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        with _build_lock(build_dir), _pinned_ninja():
            clear_stale_lock(build_dir)
            builder.load(verbose=False)
        loaded.append(builder.name)
    return loaded


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("DeepSpeed ops ready:", ", ".join(load_ops()) or "none needed")
