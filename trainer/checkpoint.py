"""Atomic checkpoint layout: write into a temp dir, fsync, rename last, keep the newest K.

Layout under the checkpoint root::

    step-00000200/
        ds/, portable/    the engine's state (trainer/ds_checkpoint.py writes and reads it;
                          portable.pt instead of portable/ in checkpoints from before the sharded form)
        ema.pt            the weights' moving average, when the job keeps one (trainer/ema.py)
        meta.json         step, topology, data position, routing totals, resolved config

A checkpoint is written into ``.tmp-step-N``, fsynced, then renamed to
``step-N``; the rename is the commit. A checkpoint is complete when its
directory is named ``step-N`` and holds meta.json (written last, before the
fsync): a crash while writing leaves the previous one the latest, and a dot-dir
is never chosen. The last ``keep_last`` are kept; an old one is renamed away
before it is deleted, so a crash while pruning leaves no half-deleted
``step-N``. This module knows nothing of DeepSpeed: ``CheckpointManager``
hands the directory to ``save_state``/``load_state`` of the adapter.

The root may also be an ``s3://bucket/prefix`` URL: object stores have no rename, so
each rank stages its files locally and uploads them, and rank 0 writes meta.json,
the commit marker, last, after every rank's upload (trainer/storage.py). Checkpoints
there are named by URL strings, local ones by Paths; the functions below take both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from . import storage
from .ds_checkpoint import load_state, save_state

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP = ".tmp-"  # in-progress writes (.tmp-step-N) and checkpoints being pruned (.tmp-old-step-N)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _step_of(ckpt: str | Path) -> int:
    return int(_STEP_DIR.match(Path(str(ckpt)).name).group(1))


def _list_remote(root: str) -> list[str]:
    """Complete checkpoints under an object-store root: step-N prefixes whose meta.json exists."""
    urls = [storage.join(root, n) for n in storage.list_names(root) if _STEP_DIR.match(n)]
    committed = storage.existing([storage.join(u, "meta.json") for u in urls])
    return sorted((u for u, ok in zip(urls, committed) if ok), key=_step_of)


def list_checkpoints(root: str | Path) -> list[Path] | list[str]:
    """Complete checkpoints under ``root`` (renamed and holding meta.json), oldest first
    (URL strings under an ``s3://`` root)."""
    if storage.is_remote(root):
        return _list_remote(str(root).rstrip("/"))
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | str | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path | str:
    """A checkpoint dir, a checkpoint root, or a run dir (holding checkpoints/) -> checkpoint dir
    (local paths or ``s3://`` URLs)."""
    if storage.is_remote(path):
        url = str(path).rstrip("/")
        if url.rsplit("/", 1)[-1].startswith(_TMP):
            raise FileNotFoundError(f"{url!r} is an uncommitted checkpoint")
        if storage.exists(storage.join(url, "meta.json")):
            return url
        for root in (url, storage.join(url, "checkpoints")):
            found = latest_checkpoint(root)
            if found is not None:
                return found
        raise FileNotFoundError(f"no complete checkpoint found at {url!r}")
    path = Path(path).expanduser().resolve()
    if path.name.startswith(_TMP):
        raise FileNotFoundError(f"{str(path)!r} is an uncommitted checkpoint (never renamed from {_TMP}*)")
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint found at {str(path)!r}")


def read_meta(ckpt: str | Path) -> dict:
    """meta.json of a checkpoint."""
    if storage.is_remote(ckpt):
        return json.loads(storage.read_bytes(storage.join(str(ckpt), "meta.json")))
    return json.loads((Path(ckpt) / "meta.json").read_text())


class CheckpointManager:
    """save(step)/load() of one run's checkpoints under ``root`` (collective calls).

    portable: also store the portable state (sharded: each rank its slices) that resumes on
    another world size, ep_size or ZeRO stage (see trainer/ds_checkpoint.py).
    ema: a WeightEma (trainer/ema.py) saved with every checkpoint and restored by ``load``.
    stage_dir: with an ``s3://`` root, this node's local folder for staging uploads and
    downloads (default: trainer.storage.stage_root).
    """

    def __init__(self, root: str | Path, *, keep_last: int = 3, portable: bool = True, ema=None,
                 stage_dir: str | Path | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.remote = storage.is_remote(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.stage = Path(stage_dir) if stage_dir else storage.stage_root(str(self.root))
        self.keep_last = keep_last
        self.portable = portable
        self.ema = ema

    def latest(self) -> Path | str | None:
        return latest_checkpoint(self.root)

    def save(self, engine, step: int, meta: dict,
             before_commit: Callable[[Path | str], None] | None = None) -> Path | str:
        """Write checkpoint ``step`` atomically; returns its final path (on every rank).

        meta: JSON-serialisable extras (data position, routing totals, config)
        written by rank 0. ``before_commit(tmp_dir)`` runs on rank 0 after every
        file is durable and before the rename (tests kill the process there).
        """
        if self.remote:
            return self._save_remote(engine, step, meta, before_commit)
        rank = _rank()
        tmp = self.root / f"{_TMP}step-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        topology = save_state(engine, tmp, portable=self.portable)
        if self.ema is not None:
            self.ema.save(tmp)
        _barrier()  # every rank's files are written
        if rank == 0:
            full_meta = {"step": step, **topology, **meta}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))
            _fsync_tree(tmp)
            if before_commit is not None:
                before_commit(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        log.info("checkpoint step %d -> %s", step, final)
        return final

    def _prune(self) -> None:
        for stale in self.root.glob(f"{_TMP}*"):  # writes and prunes a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            doomed = old.with_name(f"{_TMP}old-{old.name}")
            os.rename(old, doomed)  # no longer complete before any of its files goes
            shutil.rmtree(doomed, ignore_errors=True)

    def load(self, engine, ckpt: str | Path, *, world_size: int, ep_size: int) -> dict:
        """Restore engine state from ``ckpt``; returns its meta dict (every rank).

        Same topology: DeepSpeed's own sharded load. Different worker count,
        ep_size or ZeRO stage: the portable state, re-sharded.
        An ``s3://`` checkpoint is downloaded first, once per node.
        """
        if storage.is_remote(ckpt):
            return self._load_remote(engine, str(ckpt), world_size=world_size, ep_size=ep_size)
        ckpt = Path(ckpt)
        meta = read_meta(ckpt)
        load_state(engine, ckpt, meta, world_size=world_size, ep_size=ep_size)
        if self.ema is not None:
            self.ema.load(ckpt)
        return meta

    # ------------------------------------------------------------- object storage (s3://)
    def _save_remote(self, engine, step: int, meta: dict,
                     before_commit: Callable[[Path | str], None] | None) -> str:
        """Stage locally, upload (every rank its own files), barrier, then meta.json last (rank 0)."""
        rank = _rank()
        url = storage.join(self.root, f"step-{step:08d}")
        local = self.stage / f"step-{step:08d}.rank{rank}"  # this rank's files only: it uploads them
        if rank == 0:
            # leftovers of a crashed upload of this step, or this step saved before: meta.json first,
            # so it is never a complete checkpoint with a mix of files
            storage.delete_file(storage.join(url, "meta.json"))
            storage.delete_tree(url)
        for stale in self.stage.glob(f"step-*.rank{rank}"):  # this one, and uploads a killed rank left
            shutil.rmtree(stale, ignore_errors=True)
        local.mkdir(parents=True)
        _barrier()
        try:
            topology = save_state(engine, local, portable=self.portable)
            if self.ema is not None:
                self.ema.save(local)
            storage.upload_tree(local, url)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        _barrier()  # every rank's files are uploaded
        if rank == 0:
            if before_commit is not None:
                before_commit(url)
            full_meta = {"step": step, **topology, **meta}
            storage.write_bytes(storage.join(url, "meta.json"),
                                json.dumps(full_meta, indent=1, default=str).encode())  # the commit
            self._prune_remote()
        _barrier()
        log.info("checkpoint step %d -> %s", step, url)
        return url

    def _prune_remote(self) -> None:
        """Keep the newest ``keep_last``; delete older ones and uncommitted uploads (a crash's), each
        meta.json first so a half-deleted prefix is never a complete checkpoint."""
        names = [n for n in storage.list_names(self.root) if _STEP_DIR.match(n)]
        complete = _list_remote(self.root)
        doomed = complete[: -self.keep_last] + [u for n in names if (u := storage.join(self.root, n)) not in complete]
        for url in doomed:
            storage.delete_file(storage.join(url, "meta.json"))
            storage.delete_tree(url)

    def _load_remote(self, engine, url: str, *, world_size: int, ep_size: int) -> dict:
        raw = storage.read_bytes(storage.join(url, "meta.json"))
        meta = json.loads(raw)
        folder, mine = storage.fetch_tree(url, self.stage, version=raw.decode())
        load_state(engine, folder, meta, world_size=world_size, ep_size=ep_size)
        if self.ema is not None:
            self.ema.load(folder)
        _barrier()  # every rank of this node has read the download
        if mine:
            storage.release_fetched(folder)
        log.info("loaded %s (downloaded to %s)", url, folder)
        return meta
