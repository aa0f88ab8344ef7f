"""Which shard sources are one local path: plain paths and file: URLs; not pipe:, URLs or patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

from condmoe.datasets import read_manifest, resolve_shards
from condmoe.datasets.urls import is_local, is_local_path, is_pattern, local_path


@pytest.mark.parametrize("source, path", [
    ("data/fmnist", Path("data/fmnist")),
    ("/d/fmnist", Path("/d/fmnist")),
    ("~/d/train-000000.tar", Path("~/d/train-000000.tar")),
    ("/d/x:y.tar", Path("/d/x:y.tar")),
    ("file:///d/fmnist", Path("/d/fmnist")),
    ("file:/d/fmnist", Path("/d/fmnist")),
    ("file:data/fmnist", Path("data/fmnist")),
])
def test_local_paths(source, path):
    assert is_local(source) and is_local_path(source) and not is_pattern(source)
    assert local_path(source) == path


@pytest.mark.parametrize("source", [
    "pipe:cat /d/train-000000.tar",
    "s3://bucket/fmnist",
    "gs://bucket/fmnist/train-000000.tar",
    "memory://condmoe-test",
    "https://host/d/train-000000.tar",
])
def test_urls_and_pipes_are_not_local(source):
    assert not is_local(source) and not is_local_path(source) and local_path(source) is None


@pytest.mark.parametrize("source, local_shards", [
    ("/d/train-{000000..000009}.tar", True),
    ("data/train-{000000..000009}.tar", True),
    ("file:///d/train-{000000..000009}.tar", True),
    ("/d/a.tar::/d/b.tar", True),
    ("pipe:cat /d/train-{000000..000009}.tar", False),
    ("s3://bucket/train-{000000..000009}.tar", False),
])
def test_patterns_are_not_one_path(source, local_shards):
    assert is_pattern(source) and not is_local_path(source) and local_path(source) is None
    assert is_local(source) == local_shards  # the form of the shards the pattern expands to


def test_file_urls_read_like_paths(digits_dir):
    url = f"file://{digits_dir}"
    assert read_manifest(url).shards == read_manifest(digits_dir).shards
    by_url, meta = resolve_shards(url, "val")
    by_path, meta_path = resolve_shards(digits_dir, "val")
    assert [(s.url, s.name, s.samples) for s in by_url] == [(s.url, s.name, s.samples) for s in by_path]
    assert meta == meta_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(f"file://{digits_dir}/nope.tar", "val")
