"""Flat tensor slices stored with torch.distributed.checkpoint (DCP), the metadata as checked JSON.

Each rank hands ``write_slices`` a dict ``{key: Slice(tensor, offset, numel)}``:
its elements ``[offset, offset + tensor.numel())`` of a flattened tensor of
``numel`` elements. DCP writes each rank's slices into its own file; the
coordinator (rank 0) writes ``index.json``::

    __R_0.distcp   rank R's slices, one ``torch.save``'d flat tensor each (DCP's file layout)
    index.json     {"format", "tensors": {key: {"numel", "dtype", "chunks": [{"offset", "length",
                   "file", "at", "bytes"}, ...]}}, ...the caller's extra fields}

``read_slices`` fills another set of Slices (any partition of the same
tensors): DCP's load planner intersects them with the stored chunks and reads
only the overlapping ranges, straight into the target tensors. A Slice is the
plain-object form of a sharded tensor to DCP (its ``__create_write_items__`` /
``__create_chunk_list__`` protocol): ZeRO 1/2 own arbitrary ranges of a
flattened parameter, which DTensor's placements cannot express (a ShardedTensor
could, at the cost of one per tensor built over a process group, an API torch
is retiring in favour of DTensor).

Safety: torch 2.13's ``FileSystemReader.read_metadata`` unpickles DCP's
``.metadata`` with plain ``pickle.load`` (a crafted file runs code on load),
and its default load planner reads non-tensor items with
``torch.load(weights_only=False)``. Here no ``.metadata`` is written or read:
``index.json`` holds the metadata, parsed and checked (format tag, dtype names
from a fixed list, file names of the form ``__R_N.distcp``, chunks that tile
each tensor exactly once), the tensor chunks are read with DCP's
``torch.load(..., weights_only=True)``, and non-tensor items are refused. Stock
``dcp.load`` cannot open these directories (no ``.metadata``), which keeps them
off its unpickling path too. The layout of the .distcp files is DCP's; the
index is ours, so a torch upgrade that changes DCP's pickled metadata does not
change what condmoe reads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    CheckpointException,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo, _write_item
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future

from .ds_checkpoint import refused

INDEX = "index.json"
FORMAT = "condmoe-sharded-1"
_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class Slice:
    """A rank's elements ``[offset, offset + tensor.numel())`` of a flattened tensor of ``numel`` elements.

    tensor: any layout; 1-D views into DeepSpeed's flat partitions in practice, whole
    (possibly channels_last) tensors at ZeRO 0. To DCP it is a sharded tensor with one chunk.
    """

    def __init__(self, tensor: torch.Tensor, offset: int, numel: int) -> None:
        if offset < 0 or offset + tensor.numel() > numel:
            raise ValueError(f"slice [{offset}, {offset + tensor.numel()}) outside a tensor of {numel} elements")
        self.tensor, self.offset, self.numel = tensor, offset, numel
        self._pending: torch.Tensor | None = None  # reading into a non-contiguous tensor: its chunks land here
        self._missing = 0

    def size(self) -> torch.Size:  # DCP compares it with the stored size
        return torch.Size([self.numel])

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=torch.Size([self.tensor.numel()]))

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        props = TensorProperties(dtype=self.tensor.dtype)
        return [WriteItem(index=MetadataIndex(fqn, [self.offset]), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(), properties=props, size=self.size()))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def flat(self) -> torch.Tensor:
        """The elements to write, flat (a copy only when the tensor is not contiguous)."""
        t = self.tensor.detach()
        return t.reshape(-1)

    def target(self) -> torch.Tensor:
        """Where read chunks go: a flat view, or a flat buffer copied into the tensor once complete."""
        if self.tensor.is_contiguous():
            return self.tensor.detach().view(-1)
        if self._pending is None:
            self._pending = torch.empty(self.tensor.numel(), dtype=self.tensor.dtype, device=self.tensor.device)
            self._missing = self.tensor.numel()
        return self._pending

    def received(self, n: int) -> None:
        if self._pending is None:
            return
        self._missing -= n
        if self._missing == 0:
            with torch.no_grad():
                self.tensor.copy_(self._pending.view(self.tensor.shape))
            self._pending = None


class _SavePlanner(DefaultSavePlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[index.fqn].flat()


class _LoadPlanner(DefaultLoadPlanner):
    """Reads chunks straight into each Slice's tensor; refuses anything but tensors."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # not DefaultLoadPlanner's: its _init_state_dict replaces objects it does not know (a Slice) by None
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def resolve_tensor(self, read_item):
        target = self.state_dict[read_item.dest_index.fqn].target()
        return target.narrow(0, read_item.dest_offsets[0], read_item.lengths[0])

    def commit_tensor(self, read_item, tensor) -> None:
        self.state_dict[read_item.dest_index.fqn].received(read_item.lengths[0])

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"refused to unpickle {read_item.dest_index.fqn!r}: the sharded state holds tensors only")


class _Writer(FileSystemWriter):
    """DCP's per-rank files; the coordinator writes index.json (ours, JSON) instead of the pickled .metadata."""

    def __init__(self, path: Path, extra: dict) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
        self.extra = extra

    def write_data(self, plan: SavePlan, planner) -> Future:
        """This rank's slices into ``__R_0.distcp``, one at a time: DCP's own loop (torch 2.13) keeps
        every tensor it wrote until the file is closed, so the copies a view needs (``torch.save``
        stores a view's whole storage) would add up to the rank's whole share."""
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise ValueError(f"{item.index.fqn!r}: the sharded state stores tensors only")
                tensor = planner.resolve_data(item).detach().cpu()
                if tensor.untyped_storage().size() != tensor.nbytes:
                    tensor = tensor.clone()  # just this slice's bytes
                results.append(_write_item(self.transforms, stream, tensor, item, name, self.serialization_format))
                del tensor
            stream.flush()
            os.fsync(stream.fileno())
        done: Future = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results) -> None:
        tensors = {fqn: {"numel": md.size[0], "dtype": str(md.properties.dtype).removeprefix("torch."),
                         "chunks": []} for fqn, md in metadata.state_dict_metadata.items()}
        sizes = {(fqn, c.offsets[0]): c.sizes[0] for fqn, md in metadata.state_dict_metadata.items()
                 for c in md.chunks}
        for wr in chain.from_iterable(results):
            info, off = wr.storage_data, wr.index.offset[0]
            if info.transform_descriptors:
                raise ValueError(f"{wr.index.fqn}: stream transforms {info.transform_descriptors} are not stored")
            tensors[wr.index.fqn]["chunks"].append({"offset": off, "length": sizes[wr.index.fqn, off],
                                                    "file": info.relative_path, "at": info.offset,
                                                    "bytes": info.length})
        for fqn, t in tensors.items():
            t["chunks"].sort(key=lambda c: c["offset"])
            _check_tensor(fqn, t)  # every element written exactly once
        _write_json(Path(self.path) / INDEX, {"format": FORMAT, **self.extra, "tensors": tensors})


class _Reader(FileSystemReader):
    """DCP's reader with the metadata from a checked index.json (never the pickled .metadata)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=None, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def write_slices(directory: Path, slices: dict[str, Slice], extra: dict | None = None) -> None:
    """Write every rank's ``slices`` into ``directory`` (collective); ``extra``: rank 0's JSON fields."""
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # without a process group DCP warns that it runs alone: it is meant to
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(slices, storage_writer=_Writer(directory, extra or {}), planner=_SavePlanner(),
                 no_dist=not dist.is_initialized())


def read_index(directory: Path) -> dict:
    """index.json, checked: known format and dtypes, plain file names, chunks that tile each tensor."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable sharded-state index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a condmoe sharded state (format {FORMAT!r} expected)")
    try:
        for fqn, t in index["tensors"].items():
            _check_tensor(fqn, t)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return index


def _check_tensor(fqn: str, t: dict) -> None:
    """A tensor's index entry: a known dtype, chunks in plain DCP files that tile [0, numel) once."""
    if t["dtype"] not in _DTYPES:
        raise ValueError(f"{fqn}: unknown dtype {t['dtype']!r}")
    end = 0
    for c in t["chunks"]:
        if not _FILE.match(str(c["file"])):
            raise ValueError(f"{fqn}: chunk file {c['file']!r} is not a __R_N.distcp name")
        if not all(type(c[k]) is int and c[k] >= 0 for k in ("offset", "length", "at", "bytes")):
            raise ValueError(f"{fqn}: malformed chunk {c}")
        if c["offset"] != end:
            raise ValueError(f"{fqn}: chunks leave a gap or overlap at element {end}")
        end += c["length"]
    if type(t["numel"]) is not int or end != t["numel"]:
        raise ValueError(f"{fqn}: chunks cover {end} of {t['numel']} elements")


def _metadata(index: dict) -> Metadata:
    """DCP's Metadata for the tensors of a checked index."""
    md, storage = {}, {}
    for fqn, t in index["tensors"].items():
        chunks = []
        for c in t["chunks"]:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size([c["offset"]]), sizes=torch.Size([c["length"]])))
            storage[MetadataIndex(fqn, [c["offset"]])] = _StorageInfo(c["file"], c["at"], c["bytes"])
        md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_DTYPES[t["dtype"]]),
                                        size=torch.Size([t["numel"]]), chunks=chunks)
    return Metadata(state_dict_metadata=md, storage_data=storage)


def read_slices(directory: Path, targets: dict[str, Slice], index: dict, *, alone: bool = False) -> None:
    """Fill every rank's ``targets`` from ``directory`` (collective unless ``alone``): only the
    stored chunks that overlap a target are read.

    A chunk that is not a plain tensor is refused (weights-only load), on every rank alike.
    """
    for fqn, s in targets.items():
        stored = index["tensors"].get(fqn)
        if stored is None or stored["numel"] != s.numel:
            raise ValueError(f"{directory}: {fqn!r} " + ("is missing" if stored is None else
                             f"holds {stored['numel']} elements, the model {s.numel}"))
    try:
        with warnings.catch_warnings():  # without a process group DCP warns that it runs alone: it is meant to
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(targets, storage_reader=_Reader(directory, _metadata(index)), planner=_LoadPlanner(),
                     no_dist=alone or not dist.is_initialized())
    except CheckpointException as e:  # DCP gathers every rank's failure: report the first in one line
        err = next(iter(e.failures.values()))
        err = err[0] if isinstance(err, tuple) else err
        if isinstance(err, pickle.UnpicklingError):
            raise refused(directory, err) from None
        raise ValueError(f"{directory}: {str(err).strip().splitlines()[-1]}") from err


def read_full(directory: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors (shaped) of ``keys`` (default: all), in this process alone: for tools and tests."""
    index = read_index(directory)
    shapes = index.get("shapes", {})
    out, targets = {}, {}
    for fqn in keys if keys is not None else index["tensors"]:
        t = index["tensors"][fqn]
        out[fqn] = torch.empty(shapes.get(fqn.split("/", 1)[1], [t["numel"]]), dtype=_DTYPES[t["dtype"]])
        targets[fqn] = Slice(out[fqn], 0, t["numel"])
    read_slices(directory, targets, index, alone=True)
    return out
