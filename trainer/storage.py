"""Where checkpoints live: a local folder, or an ``s3://bucket/prefix`` (pyarrow.fs for both).

Local roots keep the POSIX layout of trainer/checkpoint.py (write a temp dir, fsync,
rename). Object stores have no rename, so a checkpoint on S3 is written like this:

1. rank 0 deletes whatever an earlier crash left under ``step-N/``;
2. each rank writes its files into its OWN local staging folder (node-local disk,
   :func:`stage_root`), exactly as it would into a shared folder, and uploads them
   to ``step-N/`` (:func:`upload_tree`);
3. after a barrier (every rank's upload finished) rank 0 writes ``meta.json``, the
   commit marker, as ONE object, last.

A checkpoint counts only when its meta.json exists (S3 is read-after-write
consistent), so a crash during step 2 leaves the previous one the latest. Pruning
deletes an old checkpoint's meta.json first, then the rest. Resuming downloads the
checkpoint once per node into a local folder (:func:`fetch_tree`, a file lock
shares it between the ranks of one node) and loads from there.

Endpoint and region come from the environment (condmoe.datasets.urls); credentials
only from the AWS SDK's own chain. Nothing here logs or stores them. Every failure
is a :class:`StorageError` whose one line names the URL.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from condmoe.datasets.urls import ENDPOINT_ENV, filesystem, is_s3

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # copy chunk: 1 MiB chunks (pyarrow's default) read 7x slower from S3 (ranged GETs)
STAGE_ENV = "CONDMOE_STAGE_DIR"  # node-local staging folder (default: the system temp dir)


class StorageError(ConnectionError):
    """Object storage refused or could not be reached; the message is one line naming the URL
    (a ConnectionError: the CLI prints those as one line, before Ray starts)."""


def is_remote(root: str | Path) -> bool:
    """True for a checkpoint root on object storage (``s3://``)."""
    return is_s3(root)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a URL."""
    return "/".join([root.rstrip("/"), *parts])


def credential_source() -> str | None:
    """Where the AWS SDK will find credentials, by name only (never a value); None when nothing
    visible (an instance role may still answer, or requests go out unsigned)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID"
    if env.get("AWS_PROFILE"):
        name = env["AWS_PROFILE"]
        files = [Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials"),
                 Path(env.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")]
        heads = {f"[{name}]", f"[profile {name}]"}
        found = any(line.strip() in heads for f in files if f.is_file() for line in f.read_text().splitlines())
        return f"profile {name!r}" if found else None
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "AWS_WEB_IDENTITY_TOKEN_FILE"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials"
    shared = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    return "shared credentials file" if shared.is_file() else None


_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY",
           "SIGNATURE_DOES_NOT_MATCH", "MissingAuthenticationToken", "UNRECOGNIZED_CLIENT", "Forbidden")
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Could not resolve", "Connection refused",
                "Timeout", "timed out")


def _explain(url: str, exc: BaseException) -> StorageError:
    """One line for a failed S3 call: what went wrong, naming the URL (never credentials)."""
    text = " ".join(str(exc).split())
    creds = credential_source()
    if any(k in text for k in _NO_BUCKET):
        why = f"bucket {url.split('/')[2]!r} does not exist"
    elif any(k in text for k in _UNREACHABLE):
        endpoint = next((os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), "AWS")
        why = f"endpoint {endpoint} unreachable (storage.endpoint_url / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"
    elif creds is None:
        why = ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / "
               f"storage.profile); the request failed: {text[:160]}")
    elif any(k in text for k in _DENIED):
        why = f"access denied with the credentials of {creds}"
    else:
        why = text[:300]
    return StorageError(f"{url}: {why}")


def _fs(url: str):
    try:
        return filesystem(url)
    except OSError as exc:  # region lookup of a bucket
        raise _explain(url, exc) from None


def exists(url: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _explain(url, exc) from None


def list_names(url: str) -> list[str]:
    """Names directly under ``url`` (files and "folders"); [] when there is nothing."""
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise _explain(url, exc) from None
    return sorted(i.base_name for i in infos)


def existing(urls: list[str]) -> list[bool]:
    """Which of ``urls`` (on one filesystem) exist; one request each."""
    import pyarrow.fs as pafs

    if not urls:
        return []
    fs, _ = _fs(urls[0])
    paths = [_fs(u)[1] for u in urls]
    try:
        return [i.type != pafs.FileType.NotFound for i in fs.get_file_info(paths)]
    except OSError as exc:
        raise _explain(urls[0], exc) from None


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    try:
        with fs.open_input_file(path) as f:  # one GET (an input *stream* reads in small ranges)
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
            raise FileNotFoundError(f"{url} does not exist") from None
        raise _explain(url, exc) from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object (it appears whole or not at all)."""
    fs, path = _fs(url)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise _explain(url, exc) from None


def delete_file(url: str) -> None:
    """Delete one object (a missing one is fine)."""
    fs, path = _fs(url)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" not in str(exc).lower() and "NoSuchKey" not in str(exc):
            raise _explain(url, exc) from None


def delete_tree(url: str) -> None:
    """Delete everything under ``url`` (nothing there is fine)."""
    fs, path = _fs(url)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" in str(exc).lower() or "NoSuchKey" in str(exc):
            return
        raise _explain(url, exc) from None


def upload_tree(local: Path, url: str) -> None:
    """Copy the files under ``local`` to ``url`` (same relative names), several at once."""
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    try:
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                        chunk_size=CHUNK, use_threads=True)
    except OSError as exc:
        raise _explain(url, exc) from None


def download_tree(url: str, local: Path) -> None:
    """Copy every object under ``url`` into the folder ``local`` (same relative names)."""
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    local.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                        chunk_size=CHUNK, use_threads=True)
    except OSError as exc:
        raise _explain(url, exc) from None


def stage_root(root: str) -> Path:
    """This node's local staging folder for checkpoints of ``root``, one per root so jobs sharing a
    node never mix files: $CONDMOE_STAGE_DIR/<hash>, else <system temp dir>/condmoe-stage-<uid>/<hash>."""
    base = os.environ.get(STAGE_ENV) or Path(tempfile.gettempdir()) / f"condmoe-stage-{os.getuid()}"
    return Path(base) / hashlib.sha1(root.encode()).hexdigest()[:16]


def fetch_tree(url: str, stage: Path, version: str = "") -> tuple[Path, bool]:
    """Download ``url`` once per node into a folder under ``stage``; returns (the folder, whether
    this process downloaded it). The ranks of one node share one copy: the first takes a file lock
    and downloads, the others find it complete. ``version`` (e.g. meta.json's bytes) tells a
    rewritten checkpoint at the same URL from a stale copy. The downloader deletes the folder with
    :func:`release_fetched` once every rank of the node has loaded it."""
    stage.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"{url}\0{version}".encode()).hexdigest()[:16]
    folder = stage / f"fetch-{key}"
    done = Path(f"{folder}.complete")
    with open(stage / f"fetch-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mine = not done.exists()
            if mine:
                shutil.rmtree(folder, ignore_errors=True)
                download_tree(url, folder)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder, mine


def release_fetched(folder: Path) -> None:
    """Delete a folder :func:`fetch_tree` downloaded (call after every rank of the node loaded it)."""
    Path(f"{folder}.complete").unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    Path(f"{folder}.lock").unlink(missing_ok=True)


def check_writable(url: str) -> None:
    """Preflight: write, read back and delete a small probe object under ``url`` (StorageError if not)."""
    probe = join(url, f".condmoe-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
        if read_bytes(probe) != b"ok":
            raise StorageError(f"{url}: a probe object read back different bytes")
        fs, path = _fs(probe)
        fs.delete_file(path)
    except StorageError as exc:
        raise StorageError(str(exc).replace(probe, url)) from None
    except OSError as exc:
        raise _explain(url, exc) from None
