"""What a shard source string names: a local path, a URL, a ``pipe:`` command or a pattern of shards.

A job's ``data.path`` (and any shard source) is one of:

- a local path (``data/fmnist``, ``/d/train-000000.tar``) or a ``file:`` URL
  (``file:///d/fmnist``): read with ``open``;
- a ``pipe:`` command (``pipe:cat /d/train-000000.tar``) or a URL with any other
  scheme (``s3://``, ``gs://``, ``memory://``, ``http://``): read by webdataset or fsspec;
- a pattern: brace ranges (``/d/train-{000000..000009}.tar``) and ``::`` joins of
  several sources; each shard it expands to is one of the forms above.

Only :func:`local_path` turns a string into a filesystem path; callers that check,
resolve or list a local path ask it (or :func:`is_local_path`) rather than testing
for ``"://"`` themselves.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


def is_local(url: str) -> bool:
    """True for a plain path or a ``file:`` URL of one shard (read with ``open``; seekable).

    ``pipe:`` and every other scheme are not local. A pattern counts by its form
    (``/d/x-{0..9}.tar`` is local); use :func:`is_local_path` for "one local path".
    """
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter: a Windows drive


def is_pattern(source: str) -> bool:
    """True for a brace pattern (``{000..009}``) or a ``::`` join of several sources."""
    return "{" in source or "::" in source


def is_local_path(source: str) -> bool:
    """True when ``source`` names ONE local file or folder (a plain path or a ``file:`` URL).

    False for ``pipe:`` commands, any other ``scheme://`` URL and patterns.
    """
    return is_local(source) and not is_pattern(source)


def local_path(source: str) -> Path | None:
    """The filesystem path ``source`` names (``file:///d/x`` -> ``/d/x``), or None when it is not
    one local path (see :func:`is_local_path`). Relative paths stay relative."""
    if not is_local_path(source):
        return None
    parsed = urlparse(source)
    return Path(parsed.path) if parsed.scheme == "file" else Path(source)
